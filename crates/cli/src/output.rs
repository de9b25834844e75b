//! Output formats: table for people, JSON and YAML for programs.

use serde::Serialize;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
    /// A table with more columns (`get services`, `get tasks`); other commands print their table.
    Wide,
}

/// Prints `value` as JSON or YAML, or calls `table` for the table form.
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T)) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value).expect("serializable output")),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value).expect("serializable output")),
        Format::Table | Format::Wide => table(value),
    }
}

/// What a command that changes something did: `value` (an object) for `-o json|yaml`, else the
/// one line `text` makes, so every command answers in the format asked for.
pub fn done(format: Format, value: serde_json::Value, text: impl FnOnce() -> String) {
    print(format, &value, |_| println!("{}", text()));
}

/// Writes `text` to standard output; a closed pipe (`berth get nodes | head`) ends the program
/// quietly instead of panicking.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// One table line: `cells` left-aligned to `widths` (0 past its end), two spaces apart.
fn table_line(cells: &[String], widths: &[usize]) -> String {
    let s: Vec<String> =
        cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0))).collect();
    s.join("  ").trim_end().to_string()
}

/// Left-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    write_stdout(&render_table(headers, rows));
}

/// Rows printed one at a time as they happen (`get --watch`): a column is as wide as the widest
/// cell printed in it so far, so the lines stay aligned as far as can be known in advance.
pub struct RowStream {
    widths: Vec<usize>,
}

impl RowStream {
    /// Prints the header line.
    pub fn new(headers: &[&str]) -> RowStream {
        let mut s = RowStream { widths: Vec::new() };
        s.line(headers.iter().map(|h| h.to_string()).collect());
        s
    }

    pub fn line(&mut self, cells: Vec<String>) {
        self.widths.resize(self.widths.len().max(cells.len()), 0);
        for (w, c) in self.widths.iter_mut().zip(&cells) {
            *w = (*w).max(c.chars().count());
        }
        write_stdout(&(table_line(&cells, &self.widths) + "\n"));
    }
}

/// One document of a stream: a line of JSON (`-o json`), or a YAML document after `---`.
pub fn stream_item<T: Serialize>(format: Format, value: &T) {
    write_stdout(&match format {
        Format::Yaml => format!("---\n{}", serde_yaml_ng::to_string(value).expect("serializable output")),
        _ => serde_json::to_string(value).expect("serializable output") + "\n",
    });
}

/// A user-facing description of an error: gRPC statuses by their message and code.
pub fn describe(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return format!("{} ({:?})", s.message(), s.code());
    }
    format!("{e:#}")
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The text of [`table`]: left-aligned columns two spaces apart, one line per row.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for cells in std::iter::once(&header).chain(rows) {
        out.push_str(&table_line(cells, &widths));
        out.push('\n');
    }
    out
}

/// Like [`print`], but a closed pipe (`berth get tasks -o json | head`) ends the program quietly
/// instead of panicking.
pub fn emit<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T)) {
    write_stdout(&match format {
        Format::Json => serde_json::to_string_pretty(value).expect("serializable output") + "\n",
        Format::Yaml => serde_yaml_ng::to_string(value).expect("serializable output"),
        Format::Table | Format::Wide => return table(value),
    });
}
