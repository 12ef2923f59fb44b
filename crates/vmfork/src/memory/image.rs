//! Frozen memory images: what a fork's RAM is made of, and what a reset copies back from.
//!
//! An image is a base file that nobody writes any more (a memfd frozen at a VM's first fork,
//! or a snapshot's memory file) and a chain of layers, one per later generation, each holding
//! only the pages written since the generation before ([`Layer`]). An image records, for every
//! page a layer covers, the newest layer that holds it; layers no page needs any more are let
//! go. Many VMs share one image, and consecutive images share their layers.

use super::layer::Layer;
use super::mapping::{HostMapping, Sharing};
use super::{MemoryLayout, PAGE_SIZE};
use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// A VM maps at most this many layer runs over its RAM (each is a mapping of its own, and the
/// process has ~65k); an image in more runs is copied into its VMs' RAM instead.
pub const MAX_MAPPED_RUNS: usize = 512;

/// Pages `[offset, offset + len)` of the RAM file, held by `layer` at the same offsets.
#[derive(Clone, Debug)]
pub struct LayerRun {
    pub offset: u64,
    pub len: u64,
    pub layer: Arc<Layer>,
}

impl LayerRun {
    fn end(&self) -> u64 {
        self.offset + self.len
    }

    fn contains(&self, offset: u64) -> bool {
        offset >= self.offset && offset < self.end()
    }

    /// The same pages of the same layer.
    pub fn same_as(&self, other: &LayerRun) -> bool {
        self.offset == other.offset
            && self.len == other.len
            && Arc::ptr_eq(&self.layer, &other.layer)
    }
}

/// An immutable RAM image: base file plus layer runs.
#[derive(Debug)]
pub struct FrozenImage {
    layout: MemoryLayout,
    base: Arc<File>,
    base_view: HostMapping,
    /// Disjoint, ascending: for every page some layer holds, the newest such layer.
    runs: Vec<LayerRun>,
}

impl FrozenImage {
    /// An image that is exactly `base` (which must never be written again).
    pub fn from_file(layout: MemoryLayout, base: Arc<File>) -> Result<Arc<Self>> {
        let len = usize::try_from(layout.total())
            .map_err(|_| Error::Memory("image larger than the address space".into()))?;
        let base_view = HostMapping::map_file_readonly(base.as_fd(), len)?;
        Ok(Arc::new(Self {
            layout,
            base,
            base_view,
            runs: Vec::new(),
        }))
    }

    /// The next generation: this image with `layer`'s pages on top. Costs O(runs), no copy.
    pub fn with_layer(self: &Arc<Self>, layer: Arc<Layer>) -> Result<Arc<Self>> {
        if let Some(&(offset, len)) = layer.runs().last() {
            if offset + len > self.layout.total() {
                return Err(Error::Memory(format!(
                    "layer page {offset:#x} lies outside the image"
                )));
            }
        }
        let fresh: Vec<LayerRun> = layer
            .runs()
            .iter()
            .map(|&(offset, len)| LayerRun {
                offset,
                len,
                layer: Arc::clone(&layer),
            })
            .collect();
        let base_view = HostMapping::map_file_readonly(self.base.as_fd(), self.base_view.len())?;
        Ok(Arc::new(Self {
            layout: self.layout.clone(),
            base: Arc::clone(&self.base),
            base_view,
            runs: overlay_runs(&self.runs, fresh),
        }))
    }

    /// A new image: this one with the pages at `offsets` replaced by their contents in `src` (a
    /// mapping of the same layout that nothing writes meanwhile). Costs O(pages), not O(RAM).
    pub fn with_pages_from(
        self: &Arc<Self>,
        src: &HostMapping,
        offsets: impl IntoIterator<Item = u64>,
    ) -> Result<Arc<Self>> {
        let mut checked = Vec::new();
        for offset in offsets {
            if offset % PAGE_SIZE != 0 || offset >= self.layout.total() {
                return Err(Error::Memory(format!(
                    "page offset {offset:#x} outside the image"
                )));
            }
            checked.push(offset);
        }
        if checked.is_empty() {
            return Ok(Arc::clone(self));
        }
        checked.sort_unstable();
        self.with_layer(Layer::copy_of(&self.layout, src, checked)?)
    }

    /// The same image with all its layer runs in one new layer: a deep chain (many layers,
    /// runs cut small by their overlaps) made flat again. Costs a copy of the layer pages.
    pub fn merged(self: &Arc<Self>) -> Result<Arc<Self>> {
        let mut builder = super::LayerBuilder::new(&self.layout)?;
        let mut pages = super::DirtyPages::new(self.layout.total());
        for run in &self.runs {
            builder.copy_run(run.layer.view(), run.offset, run.len)?;
            for offset in (run.offset..run.end()).step_by(PAGE_SIZE as usize) {
                pages.mark((offset / PAGE_SIZE) as usize);
            }
        }
        let layer = builder.seal(&pages)?;
        let flat = Self::from_file(self.layout.clone(), Arc::clone(&self.base))?;
        flat.with_layer(layer)
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    pub fn base(&self) -> &Arc<File> {
        &self.base
    }

    /// The layer runs over the base, ascending.
    pub fn runs(&self) -> &[LayerRun] {
        &self.runs
    }

    /// Whether VMs map this image's runs (few enough) or copy its pages.
    pub fn maps_runs(&self) -> bool {
        self.runs.len() <= MAX_MAPPED_RUNS
    }

    /// File offsets of the pages layers hold, in order.
    pub fn overlay_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (r.offset..r.end()).step_by(PAGE_SIZE as usize))
    }

    /// Bytes the layers hold for this image.
    pub fn overlay_bytes(&self) -> usize {
        self.runs.iter().map(|r| r.len as usize).sum()
    }

    /// Distinct layers this image uses.
    pub fn depth(&self) -> usize {
        let mut layers: Vec<*const Layer> =
            self.runs.iter().map(|r| Arc::as_ptr(&r.layer)).collect();
        layers.sort_unstable();
        layers.dedup();
        layers.len()
    }

    /// The layer run holding the page at `offset`, if a layer holds it.
    pub fn run_at(&self, offset: u64) -> Option<&LayerRun> {
        let i = self.runs.partition_point(|r| r.end() <= offset);
        self.runs.get(i).filter(|r| r.contains(offset))
    }

    /// Reads the image's bytes `[offset, offset + buf.len())` (page-aligned) into `buf`: one
    /// read of the base file (no page faults on a mapping), then each layer run on top.
    pub fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if !offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || offset + len > self.layout.total()
        {
            return Err(Error::Memory(format!(
                "image range {offset:#x}+{len:#x} is not whole pages inside the image"
            )));
        }
        let read = |file: &File, buf: &mut [u8], at: u64| {
            std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
                .map_err(|e| Error::Memory(format!("read the memory image: {e}")))
        };
        read(&self.base, buf, offset)?;
        let end = offset + len;
        let first = self.runs.partition_point(|r| r.end() <= offset);
        for run in self.runs[first..].iter().take_while(|r| r.offset < end) {
            let from = run.offset.max(offset);
            let to = run.end().min(end);
            let slice = &mut buf[(from - offset) as usize..(to - offset) as usize];
            read(run.layer.file(), slice, from)?;
        }
        Ok(())
    }

    /// Byte ranges of the base file that may hold data, ascending: everything but the holes of
    /// a sparse file (an untouched memfd or snapshot memory file is mostly holes).
    pub fn base_data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        super::mapping::data_ranges(self.base.as_fd(), self.layout.total())
    }

    /// Makes `dst` (a copy-on-write mapping of this image's base in which `previous` runs are
    /// mapped from layers and the pages at `stale` may hold private copies) show this image.
    /// Runs this image shares with `previous` stay; other old runs get the base mapped back;
    /// new runs are mapped; stale pages outside what was just mapped are copied from the
    /// image. Cost O(runs + stale pages), not O(RAM). Returns the runs now mapped, and the
    /// pages copied in (private copies) when the image has too many runs to map.
    pub fn write_view_into(
        &self,
        dst: &HostMapping,
        previous: &[LayerRun],
        stale: impl IntoIterator<Item = u64>,
    ) -> Result<(Vec<LayerRun>, Vec<u64>)> {
        let wanted: &[LayerRun] = if self.maps_runs() { &self.runs } else { &[] };
        let kept = |r: &LayerRun, set: &[LayerRun]| set.iter().any(|o| o.same_as(r));
        let mut remapped: Vec<(u64, u64)> = Vec::new();
        for old in previous.iter().filter(|r| !kept(r, wanted)) {
            dst.remap_range(
                old.offset as usize,
                old.len as usize,
                self.base.as_fd(),
                Sharing::CopyOnWrite,
            )?;
            remapped.push((old.offset, old.end()));
        }
        for new in wanted.iter().filter(|r| !kept(r, previous)) {
            dst.remap_range(
                new.offset as usize,
                new.len as usize,
                new.layer.file().as_fd(),
                Sharing::CopyOnWrite,
            )?;
            remapped.push((new.offset, new.end()));
        }
        remapped.sort_unstable();
        let fresh = |offset: u64| {
            let i = remapped.partition_point(|&(_, end)| end <= offset);
            remapped.get(i).is_some_and(|&(start, _)| start <= offset)
        };
        let mut copy: std::collections::BTreeSet<u64> =
            stale.into_iter().filter(|&o| !fresh(o)).collect();
        let mut copied = Vec::new();
        if !self.maps_runs() {
            for (start, pages) in super::page_runs(self.overlay_pages()) {
                dst.populate_write(start as usize, (pages * PAGE_SIZE) as usize)?;
            }
            copied = self.overlay_pages().collect();
            copy.extend(copied.iter().copied());
        }
        for offset in copy {
            self.copy_page_to(dst, offset)?;
        }
        Ok((wanted.to_vec(), copied))
    }

    /// Copies the image's page at file `offset` into `dst` at the same offset.
    pub fn copy_page_to(&self, dst: &HostMapping, offset: u64) -> Result<()> {
        let page = PAGE_SIZE as usize;
        match self.run_at(offset) {
            Some(run) => dst.copy_from(offset as usize, run.layer.view(), offset as usize, page),
            None => dst.copy_from(offset as usize, &self.base_view, offset as usize, page),
        }
    }
}

/// `old` runs with `fresh` ones laid on top (both disjoint and ascending): the parts of old
/// runs that fresh ones cover are cut away.
pub(crate) fn overlay_runs(old: &[LayerRun], fresh: Vec<LayerRun>) -> Vec<LayerRun> {
    let mut out: Vec<LayerRun> = Vec::with_capacity(old.len() + fresh.len());
    for run in old {
        let mut pieces = vec![(run.offset, run.end())];
        let first = fresh.partition_point(|f| f.end() <= run.offset);
        for cut in fresh[first..].iter().take_while(|f| f.offset < run.end()) {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    let left = (s, e.min(cut.offset));
                    let right = (s.max(cut.end()), e);
                    [left, right].into_iter().filter(|(a, b)| a < b)
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(s, e)| LayerRun {
            offset: s,
            len: e - s,
            layer: Arc::clone(&run.layer),
        }));
    }
    out.extend(fresh);
    out.sort_by_key(|r| r.offset);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layer::LayerBuilder;
    use crate::memory::DirtyPages;

    fn layer_with(layout: &MemoryLayout, pages: &[u64], byte: u8) -> Arc<Layer> {
        let src = HostMapping::anonymous_populated(layout.total() as usize).unwrap();
        let mut dirty = DirtyPages::new(layout.total());
        for &p in pages {
            src.write_at((p * PAGE_SIZE) as usize, &[byte; PAGE_SIZE as usize])
                .unwrap();
            dirty.mark(p as usize);
        }
        let mut b = LayerBuilder::new(layout).unwrap();
        b.copy(&src, &dirty).unwrap();
        b.seal(&dirty).unwrap()
    }

    #[test]
    fn newer_layers_cover_older_ones_and_reads_see_the_newest() {
        let layout = MemoryLayout::for_size(4 << 20).unwrap();
        let base = Arc::new(super::super::create_memfd("t", layout.total()).unwrap());
        let image = FrozenImage::from_file(layout.clone(), base).unwrap();
        let g1 = image
            .with_layer(layer_with(&layout, &[1, 2, 3, 4, 10], 1))
            .unwrap();
        let g2 = g1.with_layer(layer_with(&layout, &[2, 3, 11], 2)).unwrap();
        let spans: Vec<(u64, u64)> = g2
            .runs()
            .iter()
            .map(|r| (r.offset / 4096, r.len / 4096))
            .collect();
        assert_eq!(spans, vec![(1, 1), (2, 2), (4, 1), (10, 1), (11, 1)]);
        assert_eq!(g2.depth(), 2);
        let mut buf = vec![0u8; 16 * 4096];
        g2.read_range(0, &mut buf).unwrap();
        let first = |p: usize| buf[p * 4096];
        assert_eq!(
            [
                first(0),
                first(1),
                first(2),
                first(3),
                first(4),
                first(10),
                first(11)
            ],
            [0, 1, 2, 2, 1, 1, 2]
        );
        // A layer every page of which is covered again is let go.
        let g3 = g2.with_layer(layer_with(&layout, &[1, 4, 10], 3)).unwrap();
        assert_eq!(g3.depth(), 2);
    }
}
