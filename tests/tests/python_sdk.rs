//! The Python SDK's tests (`python/tests`, pytest) against this build's `quiverd` and `quiver`
//! binaries, so that `cargo test --workspace` runs them. The Python is `$QUIVER_TEST_PYTHON`,
//! else `python3`; it must have the SDK installed with its test extras
//! (`pip install './python[test]'`, which `.ci/run` does in a venv it makes).

use std::process::Command;

#[test]
fn python_sdk_pytest_suite_passes_against_a_real_quiverd() {
    let python = std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let quiverd = quiver_e2e::quiverd_path();
    let cli = quiverd.with_file_name("quiver");
    assert!(
        cli.exists(),
        "{} not found: `cargo build -p quiver-tools` (cargo test --workspace builds it)",
        cli.display()
    );
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    let probe = Command::new(&python)
        .args(["-c", "import quiver, pytest, polars, grpc_tools, selenium"])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (set QUIVER_TEST_PYTHON to a Python with the SDK installed)"));
    assert!(
        probe.status.success(),
        "{python} lacks the SDK or its test extras: `pip install '{sdk}[test]'` (.ci/run does it in a venv and sets \
         QUIVER_TEST_PYTHON):\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let basetemp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp"])
        .arg(basetemp.path().join("pytest"))
        .arg("tests")
        .current_dir(sdk)
        .env("QUIVERD", &quiverd)
        .env("QUIVER_CLI", &cli)
        .output()
        .expect("running pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}
