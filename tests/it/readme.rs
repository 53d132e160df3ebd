//! README's shell examples that can run on one machine, run as pasted: the script block of the
//! Pipes section, with the `xfer` under test first on PATH.

use std::path::Path;
use std::process::Command;

/// The fenced block of README.md that starts with `first_line`.
fn block(first_line: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find(&format!("```\n{first_line}"))
        .unwrap_or_else(|| panic!("no block starts {first_line:?}"));
    let body = &readme[start + 4..];
    body[..body.find("```").expect("the block ends")].to_string()
}

#[test]
fn the_pipes_script_runs_as_pasted() {
    let script = block("xfer recv --once -o - --listen 127.0.0.1:0 --insecure 2> recv.err > out.bin &");
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(crate::util::BIN).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["-e", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("XDG_CACHE_HOME", crate::util::test_cache_home())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The script ends with `cat out.bin`: what was piped in came out of the receiver's stdout.
    assert!(stdout.ends_with("hello\n"), "{stdout}");
}
