//! `ferrule version`: what this client is.
//!
//! The `ferrule.v1` API has no call that reports the controller's version yet, so only the
//! client is described: its crate version and, when it was built from a git checkout, what
//! `git describe --always --dirty` said at build time (see `build.rs`).

use std::io::{self, Write};

use serde::Serialize;

use crate::output::{self, Format, Render};

#[derive(Debug, Serialize)]
struct Versions {
    client: ClientVersion,
}

#[derive(Debug, Serialize)]
struct ClientVersion {
    version: &'static str,
    /// `git describe` of the source tree the binary was built from; absent outside git.
    git: Option<&'static str>,
}

impl Render for Versions {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        match self.client.git {
            Some(git) => writeln!(out, "ferrule {} (git {git})", self.client.version),
            None => writeln!(out, "ferrule {}", self.client.version),
        }
    }
}

pub fn run(format: Format) -> anyhow::Result<()> {
    let doc = Versions {
        client: ClientVersion {
            version: env!("CARGO_PKG_VERSION"),
            git: option_env!("FERRULE_GIT_DESCRIBE"),
        },
    };
    output::render(&doc, format, &mut io::stdout().lock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_and_json_forms() {
        let doc = Versions {
            client: ClientVersion {
                version: "0.1.0",
                git: Some("abc1234-dirty"),
            },
        };
        let mut out = Vec::new();
        output::render(&doc, Format::Table, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ferrule 0.1.0 (git abc1234-dirty)\n"
        );
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"client": {"version": "0.1.0", "git": "abc1234-dirty"}})
        );
    }
}
