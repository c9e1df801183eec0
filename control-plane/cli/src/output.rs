//! Rendering command results as a table (for people) or JSON/YAML (for scripts).
//!
//! A verb builds a [`Render`] document, a serde struct of its own with stable snake_case
//! field names, and hands it to [`render`]. Tables are aligned with `tabwriter`; an empty cell
//! shows as `-` so columns stay readable.

use std::io::{self, Write};

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;
use tabwriter::TabWriter;

/// `-o table|json|yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
}

/// A command result: serialised as is for JSON and YAML, and written by
/// [`Render::write_human`] for the table format.
pub trait Render: Serialize {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()>;
}

/// Writes `doc` to `out` in `format`.
pub fn render(doc: &impl Render, format: Format, out: &mut impl Write) -> anyhow::Result<()> {
    // Encode first, then write: an encoding failure is a bug, a write failure (a closed
    // pipe) is an io::Error the caller can recognise.
    let mut text = Vec::new();
    match format {
        Format::Table => doc.write_human(&mut text)?,
        Format::Json => {
            serde_json::to_writer_pretty(&mut text, doc).context("cannot encode JSON")?;
            text.push(b'\n');
        }
        Format::Yaml => serde_yaml::to_writer(&mut text, doc).context("cannot encode YAML")?,
    }
    out.write_all(&text)?;
    out.flush()?;
    Ok(())
}

/// Writes aligned columns: `headers`, then one line per row.
pub fn write_table(out: &mut dyn Write, headers: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut tw = TabWriter::new(out).padding(3);
    writeln!(tw, "{}", headers.join("\t"))?;
    for row in rows {
        let cells: Vec<&str> = row
            .iter()
            .map(|c| if c.is_empty() { "-" } else { c.as_str() })
            .collect();
        writeln!(tw, "{}", cells.join("\t"))?;
    }
    tw.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Doc {
        items: Vec<(String, u32)>,
    }

    impl Render for Doc {
        fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
            let rows: Vec<Vec<String>> = self
                .items
                .iter()
                .map(|(name, n)| vec![name.clone(), n.to_string()])
                .collect();
            write_table(out, &["NAME", "COUNT"], &rows)
        }
    }

    fn rendered(format: Format) -> String {
        let doc = Doc {
            items: vec![("user".into(), 2), (String::new(), 10)],
        };
        let mut out = Vec::new();
        render(&doc, format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tables_align_and_mark_empty_cells() {
        assert_eq!(
            rendered(Format::Table),
            "NAME   COUNT\nuser   2\n-      10\n"
        );
    }

    #[test]
    fn json_and_yaml_serialise_the_document() {
        let json: serde_json::Value = serde_json::from_str(&rendered(Format::Json)).unwrap();
        assert_eq!(json["items"][0][0], "user");
        assert_eq!(json["items"][1][1], 10);
        assert_eq!(
            rendered(Format::Yaml),
            "items:\n- - user\n  - 2\n- - ''\n  - 10\n"
        );
    }
}
