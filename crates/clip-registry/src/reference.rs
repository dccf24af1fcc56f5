//! Parsing `[host[:port]/]repo[:tag][@digest]` into a [`Reference`].
//!
//! The grammar is distribution's (the one oci-spec's `Reference::from_str`
//! encodes in a regex), checked by hand: compiling that regex, with its
//! Unicode classes, costs about 40 ms of CPU in every process that parses
//! a reference, which is most of a cached container's start. Results match
//! oci-spec's parser (see the tests), except that a tag's word characters
//! are ASCII, as in distribution.

use oci_spec::distribution::{ParseError, Reference};

const NAME_TOTAL_LENGTH_MAX: usize = 255;

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `[a-z0-9]+ (sep [a-z0-9]+)*` where sep is `.`, `_`, `__` or any run of `-`.
fn path_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !lower_alnum(b[0]) || !lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !lower_alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn domain_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// `component ('.' component)* (':' [0-9]+)?`
fn domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    host.split('.').all(domain_component) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

fn name(s: &str) -> bool {
    let mut parts = s.split('/');
    let first = parts.next().unwrap_or("");
    let rest: Vec<&str> = parts.collect();
    let rest_ok = rest.iter().all(|p| path_component(p));
    (path_component(first) && rest_ok) || (!rest.is_empty() && domain(first) && rest_ok)
}

/// `[\w][\w.-]{0,127}`
fn tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= 128 && word(b[0]) && b.iter().all(|c| word(*c) || *c == b'.' || *c == b'-')
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)* ':' [[:xdigit:]]{32,}`
fn digest(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|c| {
        let b = c.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Docker's normalization: no domain means Docker Hub, and a one-part
/// repository there lives under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut rest) = match name.split_once('/') {
        Some((l, r)) if l.contains('.') || l.contains(':') || l == "localhost" => (l.to_string(), r.to_string()),
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    (domain, rest)
}

pub fn parse(s: &str) -> Result<Reference, ParseError> {
    if s.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    let (rest, dig) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A tag's ':' comes after the last '/'; a port's comes before it.
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    let (nm, tg) = match rest[last..].find(':') {
        Some(i) => (&rest[..last + i], Some(&rest[last + i + 1..])),
        None => (rest, None),
    };
    if !name(nm) || !tg.is_none_or(tag) || !dig.is_none_or(digest) {
        return Err(ParseError::ReferenceInvalidFormat);
    }
    let (registry, repository) = split_domain(nm);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(ParseError::NameTooLong);
    }
    if let Some(d) = dig {
        let want = match d.split_once(':') {
            Some(("sha256", _)) => 64,
            Some(("sha384", _)) => 96,
            Some(("sha512", _)) => 128,
            _ => return Err(ParseError::DigestUnsupported),
        };
        if d.len() - d.find(':').map_or(0, |i| i + 1) != want {
            return Err(ParseError::DigestInvalidLength);
        }
    }
    Ok(match (tg, dig) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.into(), d.into()),
        (Some(t), None) => Reference::with_tag(registry, repository, t.into()),
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (None, None) => Reference::with_tag(registry, repository, "latest".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(s: &str) {
        let ours = parse(s).map_err(|e| e.to_string());
        let theirs = s.parse::<Reference>().map_err(|e| e.to_string());
        assert_eq!(ours, theirs, "{s:?}");
    }

    #[test]
    fn matches_oci_spec_on_known_cases() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        for s in [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "localhost/x",
            "localhost:5000/a/b/c:v1.2-rc_3",
            "127.0.0.1:5000/clip/busybox:latest",
            "index.docker.io/library/alpine",
            "docker.io/alpine",
            "a/b",
            "a__b/c-d---e/f.g_h:1",
            "a___b",
            "a..b",
            "a.-b",
            "-a",
            "a-",
            "A/b",
            "Upper.com/x",
            "a/B",
            "host:/x",
            "host:p/x",
            ":tag",
            "repo:",
            "repo@",
            "repo:.bad",
            "repo:_ok",
            "x@sha256:abc",
            "x@sha512:abcd",
            "x@md5:0123456789abcdef0123456789abcdef",
            "x@sha256:0123456789ABCDEF0123456789abcdef",
            "a//b",
            "/a",
            "a/",
            "a/b@",
            "foo@bar@baz",
            "a:b:c",
            "host.com:80:tag",
            "",
        ] {
            same(s);
        }
        same(&format!("repo@{d}"));
        same(&format!("127.0.0.1:5000/r:t@{d}"));
        same(&format!("r:{}", "t".repeat(128)));
        same(&format!("r:{}", "t".repeat(129)));
        same(&format!("h.io/{}", "a".repeat(256)));
    }

    #[test]
    fn matches_oci_spec_on_random_strings() {
        // A fixed-seed generator over the grammar's alphabet.
        let alphabet = b"ab0Z.-_:/@";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 12) as usize;
            let mut y = x;
            let s: String = (0..len)
                .map(|_| {
                    y = y.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(y >> 33) as usize % alphabet.len()] as char
                })
                .collect();
            same(&s);
        }
    }
}
