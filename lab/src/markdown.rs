//! Generated sections of hand-written Markdown: a program replaces the
//! text between its two marker comments (a table of results, a plot
//! link) and leaves the rest of the file as the author wrote it.

use moe_layers::{MoeError, Result};
use std::path::Path;

/// Replaces the text between the lines `begin` and `end` of `path` with
/// `body`, or appends a marked section when the file lacks the markers (or
/// the file itself); the hand-written part stays.
pub fn write_generated_section(path: &Path, begin: &str, end: &str, body: &str) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(MoeError::io(path, e)),
    };
    let section = format!("{begin}\n{body}{end}");
    let new = match (old.find(begin), old.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &old[..a], &old[b + end.len()..])
        }
        _ => format!("{old}\n{section}\n"),
    };
    std::fs::write(path, new).map_err(|e| MoeError::io(path, e))
}

/// This program's arguments as they were given, joined by spaces (one with
/// whitespace in single quotes): the command a generated section names.
pub fn given_args() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| match a.contains(char::is_whitespace) {
            true => format!("'{a}'"),
            false => a,
        })
        .collect();
    args.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_the_rest_stays() {
        let dir = std::env::temp_dir().join(format!("moe-markdown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("doc.md");
        let _ = std::fs::remove_file(&path);
        write_generated_section(&path, "<!-- B -->", "<!-- E -->", "one\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "\n<!-- B -->\none\n<!-- E -->\n"
        );
        std::fs::write(&path, "# Title\n<!-- B -->\nold\n<!-- E -->\nafter\n").unwrap();
        write_generated_section(&path, "<!-- B -->", "<!-- E -->", "new\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# Title\n<!-- B -->\nnew\n<!-- E -->\nafter\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
