//! A local OCI image layout directory (`oci:DIR[:TAG]`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use crate::manifest::{self, Fetched, Fetcher, MAX_DOC};
use crate::{digest_hex, Descriptor, Error, ImageSource, Platform, ResolvedImage, Result};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

impl LayoutSource {
    pub fn new(dir: PathBuf, tag: Option<String>) -> Self {
        Self { dir, tag }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Layout {
            dir: self.dir.clone(),
            msg: msg.into(),
        }
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs").join("sha256").join(digest_hex(digest)?))
    }

    fn open(&self, desc: &Descriptor) -> Result<File> {
        let path = self.blob_path(&desc.digest)?;
        let f = File::open(&path).map_err(|e| self.err(format!("blob {}: {e}", desc.digest)))?;
        let len = f
            .metadata()
            .map_err(|e| self.err(format!("blob {}: {e}", desc.digest)))?
            .len();
        if len != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: len,
            });
        }
        Ok(f)
    }

    fn read_small(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size > MAX_DOC {
            return Err(self.err(format!("{} is implausibly large", desc.digest)));
        }
        let mut buf = Vec::new();
        self.open(desc)?
            .read_to_end(&mut buf)
            .map_err(|e| self.err(format!("blob {}: {e}", desc.digest)))?;
        Ok(buf)
    }
}

impl Fetcher for LayoutSource {
    fn top(&self) -> Result<Fetched> {
        let layout = std::fs::read(self.dir.join("oci-layout")).map_err(|e| self.err(format!("oci-layout: {e}")))?;
        let layout: serde_json::Value =
            serde_json::from_slice(&layout).map_err(|e| self.err(format!("oci-layout: {e}")))?;
        if layout.get("imageLayoutVersion").and_then(|v| v.as_str()).is_none() {
            return Err(self.err("oci-layout has no imageLayoutVersion"));
        }
        let index = std::fs::read(self.dir.join("index.json")).map_err(|e| self.err(format!("index.json: {e}")))?;
        let index: oci_spec::image::ImageIndex =
            serde_json::from_slice(&index).map_err(|e| self.err(format!("index.json: {e}")))?;
        let name_of = |m: &oci_spec::image::Descriptor| m.annotations().as_ref().and_then(|a| a.get(REF_NAME).cloned());
        let chosen = match &self.tag {
            Some(tag) => index
                .manifests()
                .iter()
                .find(|m| name_of(m).as_deref() == Some(tag.as_str())),
            None if index.manifests().len() == 1 => index.manifests().first(),
            None => return Err(self.err("the layout holds several images: name one as oci:DIR:TAG")),
        };
        let m = chosen.ok_or_else(|| self.err(format!("no image tagged {:?}", self.tag.as_deref().unwrap_or(""))))?;
        let desc = Descriptor {
            media_type: m.media_type().to_string(),
            digest: m.digest().to_string(),
            size: m.size(),
        };
        let fetched = self.manifest(&desc)?;
        crate::verify_digest("manifest", &desc.digest, &fetched.bytes)?;
        Ok(fetched)
    }

    fn manifest(&self, desc: &Descriptor) -> Result<Fetched> {
        Ok(Fetched {
            bytes: self.read_small(desc)?,
            media_type: Some(desc.media_type.clone()),
            digest: desc.digest.clone(),
        })
    }

    fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.read_small(desc)
    }
}

impl ImageSource for LayoutSource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage> {
        manifest::resolve(self, platform)
    }

    fn open_range(&self, desc: &Descriptor, offset: u64, len: Option<u64>) -> Result<Box<dyn Read + Send>> {
        let mut f = self.open(desc)?;
        let len = len.unwrap_or(desc.size.saturating_sub(offset));
        if offset.checked_add(len).is_none_or(|end| end > desc.size) {
            return Err(Error::Range {
                digest: desc.digest.clone(),
                offset,
                len,
                size: desc.size,
            });
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| self.err(format!("blob {}: {e}", desc.digest)))?;
        Ok(Box::new(std::io::BufReader::with_capacity(256 * 1024, f.take(len))))
    }

    fn describe(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut f = self.open(desc)?;
        if offset.checked_add(len).is_none_or(|end| end > desc.size) {
            return Err(Error::Range {
                digest: desc.digest.clone(),
                offset,
                len,
                size: desc.size,
            });
        }
        let mut buf = vec![0; len as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| self.err(format!("blob {} bytes {offset}+{len}: {e}", desc.digest)))?;
        Ok(buf)
    }
}
