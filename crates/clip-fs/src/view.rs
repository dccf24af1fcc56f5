//! An image as its files: an index's tree over the host's layer store.
//! Each mount has one; every mount of the host shares the store.

use std::sync::Arc;

use clip_format::{Data, IndexFile, Node};
use clip_registry::ImageSource;
use clip_store::{LayerLayout, LayerRef, LayerStore, Priority, ReadError};

pub struct ImageView {
    index: Arc<IndexFile>,
    store: Arc<LayerStore>,
    layers: Vec<LayerRef>,
    /// Units fetched ahead of a sequential reader.
    readahead_units: usize,
}

impl ImageView {
    /// `source` is where the image's blobs are (the registry and
    /// repository, or the layout, the index names).
    pub fn new(
        index: Arc<IndexFile>,
        store: Arc<LayerStore>,
        source: Arc<dyn ImageSource>,
    ) -> Result<Arc<Self>, ReadError> {
        let layers = LayerLayout::all(&index)?
            .into_iter()
            .map(|layout| LayerRef {
                layout,
                source: source.clone(),
            })
            .collect();
        Ok(Arc::new(Self {
            index,
            store,
            layers,
            readahead_units: 2,
        }))
    }

    pub fn index(&self) -> &IndexFile {
        &self.index
    }

    pub fn index_arc(&self) -> &Arc<IndexFile> {
        &self.index
    }

    pub fn store(&self) -> &Arc<LayerStore> {
        &self.store
    }

    pub fn layers(&self) -> &[LayerRef] {
        &self.layers
    }

    fn layer(&self, layer: u32) -> Result<&LayerRef, ReadError> {
        self.layers
            .get(layer as usize)
            .ok_or_else(|| ReadError::Index(format!("no layer {layer}")))
    }

    /// Reads up to `size` bytes of a regular file at `offset`;
    /// `sequential` queues the units that follow for prefetching.
    pub fn read(&self, node: &Node, offset: u64, size: u32, sequential: bool) -> Result<Vec<u8>, ReadError> {
        if offset >= node.size {
            return Ok(Vec::new());
        }
        let end = node.size.min(offset + u64::from(size));
        let mut out = Vec::with_capacity((end - offset) as usize);
        match &node.data {
            Data::None => out.resize((end - offset) as usize, 0),
            Data::Contiguous { layer, offset: base } => {
                let l = self.layer(*layer)?;
                self.store.read(l, base + offset, end - offset, &mut out)?;
                if sequential && end < node.size {
                    let first = l.layout.unit_at(base + end);
                    let last = l.layout.unit_at(base + node.size - 1);
                    let upto = last.min(first + self.readahead_units);
                    self.store.prefetch(l, first..=upto, Priority::Readahead);
                }
            }
            Data::Sparse { layer, segments } => {
                let l = self.layer(*layer)?;
                let mut pos = offset;
                for s in segments {
                    if pos >= end {
                        break;
                    }
                    let seg_end = s.logical + s.len;
                    if seg_end <= pos {
                        continue;
                    }
                    if s.logical > pos {
                        let zeros = s.logical.min(end) - pos;
                        out.resize(out.len() + zeros as usize, 0);
                        pos += zeros;
                    }
                    if pos < end && pos >= s.logical {
                        let n = seg_end.min(end) - pos;
                        self.store.read(l, s.offset + (pos - s.logical), n, &mut out)?;
                        pos += n;
                    }
                }
                out.resize((end - offset) as usize, 0);
            }
        }
        Ok(out)
    }

    /// Writes a whole regular file (holes of sparse files as zeros), for
    /// tools that read outside a mount (`clipctl cat`, `inspect --hash`).
    pub fn copy_file(&self, node: &Node, out: &mut dyn std::io::Write) -> Result<(), CopyError> {
        const CHUNK: u32 = 1 << 20;
        let mut pos = 0;
        while pos < node.size {
            let data = self.read(node, pos, CHUNK, false)?;
            out.write_all(&data).map_err(CopyError::Write)?;
            pos += data.len() as u64;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("writing the file out")]
    Write(#[source] std::io::Error),
}
