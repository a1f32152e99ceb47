//! Where `AdminService.Checkpoint` may write: only under the configured checkpoint root.
//!
//! A checkpoint hard-links the engine's tables into a new directory, so a client that could
//! name any path could plant links to the data in any directory the server can write. The
//! rules, each refused with `INVALID_ARGUMENT` before anything is created:
//! - the path is relative to the root, or absolute and under it;
//! - it has no `..` component, and no component below the root is a symbolic link (so nothing
//!   resolves outside the root; the root itself is resolved once, at start);
//! - it is not inside the data directory;
//! - it is a new directory, or an empty one (the engine refuses a non-empty one).
//!
//! If the checkpoint fails part way, what it created is removed: the directories this call
//! created, or the entries it added to a target that existed empty.
//!
//! Without a configured root, `Checkpoint` is refused with `FAILED_PRECONDITION`.

use std::path::{Component, Path, PathBuf};

/// The directory checkpoints are confined to.
#[derive(Debug, Clone)]
pub struct CheckpointRoot {
    root: PathBuf,
    data_dir: PathBuf,
}

/// A checked target, and what to remove if the checkpoint fails.
#[derive(Debug)]
pub struct Target {
    /// Where the checkpoint goes.
    pub path: PathBuf,
    /// The outermost directory this checkpoint will create (`None`: the target exists).
    created_from: Option<PathBuf>,
}

impl CheckpointRoot {
    /// The root `root` (created if missing) for an engine in `data_dir`.
    pub fn new(root: &Path, data_dir: &Path) -> Result<CheckpointRoot, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("checkpoint root {}: {e}", root.display()))?;
        let canonical =
            |p: &Path, what: &str| std::fs::canonicalize(p).map_err(|e| format!("{what} {}: {e}", p.display()));
        let root = canonical(root, "checkpoint root")?;
        let data_dir = canonical(data_dir, "data directory")?;
        if root.starts_with(&data_dir) {
            return Err(format!("the checkpoint root {} is inside the data directory", root.display()));
        }
        Ok(CheckpointRoot { root, data_dir })
    }

    /// Checks `requested` against the rules in the module documentation.
    pub fn target(&self, requested: &str) -> Result<Target, String> {
        if requested.is_empty() {
            return Err("checkpoint path is required".into());
        }
        let requested = Path::new(requested);
        let relative = if requested.is_absolute() {
            requested.strip_prefix(&self.root).map_err(|_| {
                format!(
                    "checkpoint path {} is not under the checkpoint root {}",
                    requested.display(),
                    self.root.display()
                )
            })?
        } else {
            requested
        };
        let mut path = self.root.clone();
        let mut created_from = None;
        for c in relative.components() {
            match c {
                Component::Normal(name) => path.push(name),
                Component::CurDir => continue,
                Component::ParentDir => {
                    return Err(format!("checkpoint path {} has a \"..\"", requested.display()));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("checkpoint path {} is not a plain path", requested.display()));
                }
            }
            if created_from.is_some() {
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!("checkpoint path {} goes through a symbolic link", requested.display()));
                }
                Ok(m) if !m.is_dir() => {
                    return Err(format!(
                        "checkpoint path {}: {} is not a directory",
                        requested.display(),
                        path.display()
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => created_from = Some(path.clone()),
                Err(e) => return Err(format!("checkpoint path {}: {e}", path.display())),
            }
        }
        if path == self.root {
            return Err("the checkpoint path must name a directory under the checkpoint root".into());
        }
        if path.starts_with(&self.data_dir) {
            return Err(format!("checkpoint path {} is inside the data directory", requested.display()));
        }
        if created_from.is_none() {
            let empty = std::fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?.next().is_none();
            if !empty {
                return Err(format!("checkpoint target {} exists and is not empty", path.display()));
            }
        }
        Ok(Target { path, created_from })
    }
}

impl Target {
    /// Removes what a failed checkpoint left: the directories it created, or what it put into
    /// a target that was empty.
    pub fn clean_up(&self) {
        let result = match &self.created_from {
            Some(top) => std::fs::remove_dir_all(top),
            None => std::fs::read_dir(&self.path).and_then(|entries| {
                for e in entries {
                    let p = e?.path();
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                }
                Ok(())
            }),
        };
        if let Err(e) = result {
            tracing::warn!(target = %self.path.display(), error = %e, "could not remove a failed checkpoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_stay_under_the_root_and_out_of_the_data_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = std::fs::canonicalize(tmp.path()).expect("canonical");
        let data = base.join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let root = CheckpointRoot::new(&base.join("ck"), &data).expect("root");
        std::os::unix::fs::symlink(&outside, base.join("ck/escape")).expect("symlink");
        std::fs::write(base.join("ck/file"), b"x").expect("write");
        std::fs::create_dir_all(base.join("ck/full/x")).expect("mkdir");

        let ok = root.target("daily/2026-11-26").expect("nested new");
        assert_eq!(ok.path, base.join("ck/daily/2026-11-26"));
        assert_eq!(ok.created_from, Some(base.join("ck/daily")));
        let abs = base.join("ck/a").to_string_lossy().into_owned();
        assert_eq!(root.target(&abs).expect("absolute under root").path, base.join("ck/a"));
        for bad in [
            "",
            "../outside/x",
            "a/../../outside",
            "escape/x",
            "escape",
            "file/x",
            "full",
            ".",
            outside.to_str().expect("utf-8"),
            data.to_str().expect("utf-8"),
        ] {
            assert!(root.target(bad).is_err(), "{bad:?} accepted");
        }
        // A root inside the data directory is refused at start; the data directory inside
        // the root stays out of reach.
        assert!(CheckpointRoot::new(&data.join("ck"), &data).is_err());
        let wide = CheckpointRoot::new(&base, &data).expect("root above the data directory");
        assert!(wide.target("data/ck").is_err());
        assert!(wide.target("other").is_ok());

        // Clean-up removes only what the checkpoint created.
        let t = root.target("made/here").expect("target");
        std::fs::create_dir_all(&t.path).expect("mkdir");
        std::fs::write(t.path.join("000001.sst"), b"x").expect("write");
        t.clean_up();
        assert!(!base.join("ck/made").exists());
        std::fs::create_dir_all(base.join("ck/empty")).expect("mkdir");
        let t = root.target("empty").expect("empty target");
        std::fs::write(t.path.join("000001.sst"), b"x").expect("write");
        t.clean_up();
        assert!(
            base.join("ck/empty").is_dir() && std::fs::read_dir(base.join("ck/empty")).expect("dir").next().is_none()
        );
    }
}
