//! The imports a Python source runs when it is imported: the `import` and
//! `from … import` statements outside function bodies and outside
//! `if TYPE_CHECKING:` blocks. A line scanner, not a parser: it is fed
//! every `.py` file of an image while indexing, so it must be cheap, and a
//! wrong guess only costs a fetch (or a miss).

use serde::{Deserialize, Serialize};

/// One import statement's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// Leading dots of a relative import (0: absolute).
    pub level: u8,
    /// The module named (`a.b` in `from a.b import c`; may be empty for
    /// `from . import c`).
    pub module: String,
    /// The names after `from … import` (each may be a submodule).
    pub names: Vec<String>,
}

/// The most imports kept per file.
const MAX_IMPORTS: usize = 1024;
/// The longest logical line considered.
const MAX_LINE: usize = 16 << 10;

fn is_dotted(s: &str) -> bool {
    s.len() <= 256 && crate::is_module_name(s.as_bytes())
}

/// Logical lines of `src` (continuations joined), with string-only lines
/// (docstrings) left out, each with its indentation.
fn logical_lines(src: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut indent = 0;
    let mut depth: i64 = 0;
    let mut in_triple: Option<&str> = None;
    for line in src.lines() {
        if let Some(q) = in_triple {
            if line.contains(q) {
                in_triple = None;
            }
            continue;
        }
        if buf.is_empty() {
            let t = line.trim_start();
            // A line that opens a triple-quoted string left open.
            if let Some(q) = ["\"\"\"", "'''"].into_iter().find(|q| t.matches(q).count() % 2 == 1) {
                in_triple = Some(q);
                continue;
            }
            indent = line.len() - t.len();
        }
        let code = if line.contains('#') && !line.contains('"') && !line.contains('\'') {
            line.split('#').next().unwrap_or("")
        } else {
            line
        };
        depth += code.matches(['(', '[', '{']).count() as i64 - code.matches([')', ']', '}']).count() as i64;
        let code = code.trim();
        let cont = code.ends_with('\\');
        if !buf.is_empty() {
            buf.push(' ');
        }
        buf.push_str(code.trim_end_matches('\\'));
        if (depth > 0 || cont) && buf.len() < MAX_LINE {
            continue;
        }
        depth = 0;
        out.push((indent, std::mem::take(&mut buf)));
    }
    out
}

fn parse_statement(s: &str, out: &mut Vec<Import>) {
    if let Some(rest) = s.strip_prefix("import ") {
        for part in rest.split(',') {
            let name = part.trim().split(" as ").next().unwrap_or("").trim();
            if is_dotted(name) {
                out.push(Import {
                    level: 0,
                    module: name.to_string(),
                    names: Vec::new(),
                });
            }
        }
    } else if let Some(rest) = s.strip_prefix("from ") {
        let Some((module, names)) = rest.split_once(" import ") else {
            return;
        };
        let module = module.trim();
        let level = module.len() - module.trim_start_matches('.').len();
        let module = module.trim_start_matches('.');
        if level > 8 || !(module.is_empty() || is_dotted(module)) || (level == 0 && module.is_empty()) {
            return;
        }
        let names = names
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|n| n.trim().split(" as ").next().unwrap_or("").trim())
            .filter(|n| is_dotted(n) && !n.contains('.'))
            .map(str::to_string)
            .collect();
        out.push(Import {
            level: level as u8,
            module: module.to_string(),
            names,
        });
    }
}

/// The imports `src` runs at import time, in order.
pub fn imports(src: &[u8]) -> Vec<Import> {
    let src = String::from_utf8_lossy(src);
    let mut out = Vec::new();
    // Open blocks: (indentation, whether their body is skipped).
    let mut blocks: Vec<(usize, bool)> = Vec::new();
    for (indent, line) in logical_lines(&src) {
        if line.is_empty() || out.len() >= MAX_IMPORTS {
            continue;
        }
        while blocks.last().is_some_and(|&(i, _)| i >= indent) {
            blocks.pop();
        }
        let skipped = blocks.iter().any(|&(_, s)| s);
        let word = line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        let mut stmt = line.as_str();
        if matches!(
            word,
            "def"
                | "async"
                | "class"
                | "if"
                | "elif"
                | "else"
                | "try"
                | "except"
                | "finally"
                | "with"
                | "for"
                | "while"
        ) && line.ends_with(':')
            || (matches!(word, "try" | "else" | "finally") && line.contains(':'))
        {
            // Function bodies run later, if at all; so do the imports a
            // type checker alone sees.
            let skip =
                matches!(word, "def" | "async") || (matches!(word, "if" | "elif") && line.contains("TYPE_CHECKING"));
            blocks.push((indent, skip));
            // `try: import x` on one line.
            match line.split_once(':') {
                Some((_, tail)) if !tail.trim().is_empty() && !skip => stmt = tail.trim(),
                _ => continue,
            }
        }
        if !skipped {
            parse_statement(stmt, &mut out);
        }
    }
    out.truncate(MAX_IMPORTS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Vec<(u8, String, Vec<String>)> {
        imports(src.as_bytes())
            .into_iter()
            .map(|i| (i.level, i.module, i.names))
            .collect()
    }

    #[test]
    fn top_level_imports_in_order() {
        let src = r#"
"""Docstring that says
import not_this
"""
import os, sys as system
import a.b.c
from . import x, y as z
from ..pkg.mod import (
    one,
    two,  # comment
)
from q import *
try:
    import fast
except ImportError:
    import slow
if TYPE_CHECKING:
    import typing_only
else:
    import runtime
def f():
    import inside_function
class K:
    import in_class_body
try: import one_line
except ImportError: pass
x = "import not_a_statement"
"#;
        let v = names(src);
        let s = |l: u8, m: &str, n: &[&str]| (l, m.to_string(), n.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            v,
            vec![
                s(0, "os", &[]),
                s(0, "sys", &[]),
                s(0, "a.b.c", &[]),
                s(1, "", &["x", "y"]),
                s(2, "pkg.mod", &["one", "two"]),
                s(0, "q", &[]),
                s(0, "fast", &[]),
                s(0, "slow", &[]),
                s(0, "runtime", &[]),
                s(0, "in_class_body", &[]),
                s(0, "one_line", &[]),
            ]
        );
    }

    #[test]
    fn garbage_is_not_an_import() {
        assert!(names("import 3x\nfrom import y\nfrom ........... import z\nimport\n").is_empty());
        assert!(names(&"(".repeat(100_000)).is_empty());
        let v = imports(&[0xff, 0xfe, b'\n', b'i', b'm']);
        assert!(v.is_empty());
    }
}
