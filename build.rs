//! Embeds ringlab's own git revision (with a dirty flag) at build time, so every result records
//! the code that measured it, whatever directory the binary later runs in.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&dir);
    let revision = git(dir, &["describe", "--always", "--dirty", "--abbrev=12"])
        .unwrap_or_else(|| "unknown (built outside a git checkout)".to_string());
    println!("cargo:rustc-env=RINGLAB_GIT_REVISION={revision}");

    // Run again when the revision or the dirty state can have changed: HEAD moved, the index
    // changed, or a tracked source file was edited (the target folder is left out, or every
    // build would trigger the next).
    for path in [
        "build.rs",
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
        "clippy.toml",
        "src",
        "tests",
        "benches",
        "scripts",
        ".ci",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", git_dir.join("index").display());
        if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]) {
            let common = dir.join(common);
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
            if let Some(head_ref) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
                println!("cargo:rerun-if-changed={}", common.join(head_ref).display());
            }
        }
    }
}
