//! Writes seed inputs for the fuzz targets into `storage/fuzz/corpus/<target>/`: a real table,
//! WAL segment, manifest and data block produced by the engine. Rerun after a format change:
//! `cargo run -p quiver-storage --example gen_fuzz_corpus`.

use std::path::Path;
use std::sync::Arc;

use quiver_storage::fs::{Fs, MemFs};
use quiver_storage::{
    Background, Compression, Db, Durability, EventTime, FeatureId, ManualClock, Options, Value, WriteBatch,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (i, compression) in [Compression::None, Compression::Zstd(1), Compression::Lz4].into_iter().enumerate() {
        let fs = MemFs::new();
        let dir = Path::new("/db");
        let opts = Options {
            memtable_bytes: 1 << 20,
            block_bytes: 256,
            compression,
            background: Background::Inline,
            clock: Arc::new(ManualClock::new(1_000_000)),
            ..Options::default()
        };
        let db = Db::open_with_fs(Arc::new(fs.clone()), dir, opts)?;
        for b in 0..12 {
            let mut batch = WriteBatch::new();
            batch.put(format!("e{b}").as_bytes(), FeatureId(1), EventTime(b), Value::Int64(b))?;
            batch.put(b"e\0x", FeatureId(2), EventTime(-b), Value::StringList(vec!["a".into(), "bc".into()]))?;
            batch.put(b"emb", FeatureId(3), EventTime(b), Value::Float32Vector(vec![0.5; 8]))?;
            if b % 4 == 0 {
                batch.delete(b"e1", FeatureId(1), EventTime(b + 100))?;
            }
            db.write(batch, Durability::Sync)?;
        }
        // The WAL as it is now, before a flush empties it.
        let names = fs.list(dir)?;
        for n in &names {
            if n.ends_with(".wal") {
                if let Some(bytes) = fs.file_bytes(&dir.join(n)).filter(|b| !b.is_empty()) {
                    write(&out.join("wal"), &format!("seed-{i}"), &bytes)?;
                }
            }
        }
        db.flush()?;
        for n in fs.list(dir)? {
            let bytes = fs.file_bytes(&dir.join(&n)).unwrap_or_default();
            if n.ends_with(".sst") {
                write(&out.join("sstable"), &format!("seed-{i}"), &bytes)?;
                // The first data block's uncompressed form is the block seed.
                let t = quiver_storage::sstable::Table::open(&fs, dir, n.trim_end_matches(".sst").parse()?)?;
                let h = t.block_handle(0);
                if i == 0 {
                    write(&out.join("block"), "seed-0", &bytes[h.offset as usize..(h.offset + h.len) as usize])?;
                }
            } else if n.starts_with("MANIFEST-") {
                write(&out.join("manifest"), &format!("seed-{i}"), &bytes)?;
            }
        }
    }
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}
