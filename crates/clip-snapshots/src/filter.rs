//! containerd's filter syntax, the part snapshot listings use:
//! `field==value`, `field!=value`, `field~=value` (a substring here, where
//! containerd takes a regular expression) and bare `field` (present),
//! joined by `,` (and). Fields: `name`, `parent`, `kind`, and
//! `labels.KEY` or `labels."KEY"`. Values may be quoted.

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq,
    Ne,
    Matches,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Term {
    field: Vec<String>,
    op: Op,
    value: String,
}

/// One filter: every term must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Term>);

/// Reads a quoted string at the start of `s` (after its opening quote):
/// the text and the rest after the closing quote.
fn quoted(s: &str) -> Result<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            '"' => return Ok((out, &s[i + 1..])),
            c => out.push(c),
        }
    }
    Err(Error::InvalidArgument(format!("unterminated quote in filter: \"{s}")))
}

impl Filter {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("filter {s:?}: {why}"));
        let mut terms = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            // The field: dot-separated parts, each bare or quoted.
            let mut field = Vec::new();
            loop {
                if let Some(r) = rest.strip_prefix('"') {
                    let (part, r) = quoted(r)?;
                    field.push(part);
                    rest = r;
                } else {
                    let end = rest
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '/'))
                        .unwrap_or(rest.len());
                    if end == 0 {
                        return Err(bad("expected a field name"));
                    }
                    field.push(rest[..end].to_string());
                    rest = &rest[end..];
                }
                match rest.strip_prefix('.') {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            let (op, r) = if let Some(r) = rest.strip_prefix("==") {
                (Op::Eq, r)
            } else if let Some(r) = rest.strip_prefix("!=") {
                (Op::Ne, r)
            } else if let Some(r) = rest.strip_prefix("~=") {
                (Op::Matches, r)
            } else {
                (Op::Present, rest)
            };
            rest = r;
            let mut value = String::new();
            if op != Op::Present {
                if let Some(r) = rest.strip_prefix('"') {
                    let (v, r) = quoted(r)?;
                    value = v;
                    rest = r;
                } else {
                    let end = rest.find(',').unwrap_or(rest.len());
                    value = rest[..end].trim().to_string();
                    rest = &rest[end..];
                }
            }
            terms.push(Term { field, op, value });
            rest = rest.trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.is_empty() => {}
                None => return Err(bad("expected `,` between terms")),
            }
        }
        if terms.is_empty() {
            return Err(bad("empty"));
        }
        Ok(Self(terms))
    }

    /// Whether the filter holds, `get` giving a field's value if it has one.
    pub fn matches(&self, get: &dyn Fn(&[String]) -> Option<String>) -> bool {
        self.0.iter().all(|t| {
            let v = get(&t.field);
            match t.op {
                Op::Present => v.is_some(),
                Op::Eq => v.as_deref() == Some(t.value.as_str()),
                Op::Ne => v.as_deref() != Some(t.value.as_str()),
                Op::Matches => v.is_some_and(|v| v.contains(&t.value)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn holds(filter: &str, name: &str, labels: &[(&str, &str)]) -> bool {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Filter::parse(filter).unwrap().matches(&|f: &[String]| match f {
            [n] if n == "name" => Some(name.to_string()),
            [n] if n == "kind" => Some("committed".into()),
            [l, rest @ ..] if l == "labels" && !rest.is_empty() => labels.get(&rest.join(".")).cloned(),
            _ => None,
        })
    }

    #[test]
    fn containerd_filters() {
        assert!(holds("name==a", "a", &[]));
        assert!(!holds("name==a", "b", &[]));
        assert!(holds("name!=a", "b", &[]));
        assert!(holds(
            r#"labels."containerd.io/snapshot.ref"==sha256:x"#,
            "a",
            &[("containerd.io/snapshot.ref", "sha256:x")]
        ));
        assert!(holds(
            "labels.containerd.io/gc.root",
            "a",
            &[("containerd.io/gc.root", "t")]
        ));
        assert!(!holds("labels.x", "a", &[]));
        assert!(holds(r#"kind==committed,name=="a b""#, "a b", &[]));
        assert!(!holds("kind==committed,name==c", "a", &[]));
        assert!(holds("name~=ab", "xaby", &[]));
        assert!(Filter::parse("").is_err());
        assert!(Filter::parse("name==\"x").is_err());
        assert!(Filter::parse("==x").is_err());
    }
}
