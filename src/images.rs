//! `clipctl images`, `rmi` and `prune`: the node's stored indexes.

use anyhow::{bail, Result};
use clip_api::{Reply, Request};

/// Sizes as people read them: 1.5 GiB, 320 MiB, 12 KiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A date as UTC `YYYY-MM-DD HH:MM`.
pub fn date(secs: u64) -> String {
    clip_registry::rfc3339(secs)[..16].replace('T', " ")
}

pub fn list(json: bool) -> Result<()> {
    crate::require_root()?;
    let Reply::Images { images } = crate::client::call(&Request::Images)? else {
        bail!("clipd answered something else");
    };
    if json {
        let v = serde_json::json!({ "format_version": 1, "images": images });
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "{:<48} {:<19} {:<17} {:>10} {:>10} IN USE",
        "IMAGE", "DIGEST", "INDEXED", "SIZE", "INDEX"
    );
    for i in images {
        let digest = i.manifest_digest.trim_start_matches("sha256:");
        println!(
            "{:<48} {:<19} {:<17} {:>10} {:>10} {}",
            i.reference,
            format!("sha256:{}", &digest[..digest.len().min(12)]),
            date(i.created),
            human(i.size),
            human(i.index_bytes),
            if i.mounted { "yes" } else { "no" }
        );
    }
    Ok(())
}

pub fn rmi(images: &[String]) -> Result<()> {
    crate::require_root()?;
    for image in images {
        let Reply::Text { text } = crate::client::call(&Request::RemoveImage { image: image.clone() })? else {
            bail!("clipd answered something else");
        };
        println!("{text}");
    }
    Ok(())
}

pub fn prune() -> Result<()> {
    crate::require_root()?;
    let Reply::Text { text } = crate::client::call(&Request::Prune)? else {
        bail!("clipd answered something else");
    };
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dates_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(date(0), "1970-01-01 00:00");
        assert_eq!(date(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(date(951_782_400), "2000-02-29 00:00");
    }
}
