//! Records `git describe --always --dirty` for `ferrule version`, when the source is a git
//! checkout and git is installed; otherwise records nothing and the version shows no commit.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) else {
        return;
    };
    // HEAD moves on checkout; the index is rewritten by every commit and `git add`.
    for file in ["HEAD", "index"] {
        let path = Path::new(&git_dir).join(file);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(describe) = git(&["describe", "--always", "--dirty"]) {
        println!("cargo:rustc-env=FERRULE_GIT_DESCRIBE={describe}");
    }
}
