//! Experts beyond memory: expert matrices left in the memory-mapped
//! checkpoint files, of which a bounded set is kept in memory, least
//! recently used out first (seed 003; Eliseev & Mazur 2023,
//! "Fast Inference of Mixture-of-Experts Language Models with Offloading",
//! arXiv 2312.17238, for the LRU cache and the next layer's prefetch).
//!
//! On the CPU the file's pages are the experts' only copy: a matrix is a
//! tensor viewing the private map, read from the file when first touched.
//! [`ExpertResidency`] decides which experts' pages this process keeps:
//! using an expert makes it resident (most recently used); when the
//! resident experts exceed the capacity, the least recently used ones
//! leave (`madvise(MADV_DONTNEED)` on their pages: the process's memory
//! drops at once, the kernel's page cache keeps them while it has room,
//! and the next use reads them again). A prefetch (`MADV_WILLNEED`) asks
//! the kernel to read an expert's pages in the background, so that the
//! read overlaps the computation before its use.
//!
//! Counts ([`ResidencyStats`]): a use of a resident expert is a hit, of
//! another one a miss (its bytes are "loaded": read from the page cache
//! or the disk); prefetched experts count as loaded when prefetched.

use moe_core::{MoeError, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Device, Tensor};

/// An expert of one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// The layer's index among the model's layers.
    pub layer: usize,
    /// The expert's index in its layer.
    pub expert: usize,
}

/// What the residency did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidencyStats {
    /// Uses of an expert that was resident.
    pub hits: u64,
    /// Uses of an expert that was not.
    pub misses: u64,
    /// Experts prefetched (not resident when asked for).
    pub prefetches: u64,
    /// Bytes of experts made resident: by misses and by prefetches.
    pub bytes_loaded: u64,
    /// Experts sent out to stay within the capacity.
    pub evictions: u64,
    /// Bytes of the experts resident now.
    pub resident_bytes: u64,
    /// The capacity, bytes.
    pub capacity_bytes: u64,
}

impl std::fmt::Display for ResidencyStats {
    /// `hit rate 0.950 (95 hits, 5 misses, 3 prefetched, 2 evicted), 0.12
    /// GiB read in, 0.50 of 1.00 GiB resident`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "hit rate {:.3} ({} hits, {} misses, {} prefetched, {} evicted), {:.2} GiB read in, \
             {:.2} of {:.2} GiB resident",
            self.hit_rate(),
            self.hits,
            self.misses,
            self.prefetches,
            self.evictions,
            gib(self.bytes_loaded),
            gib(self.resident_bytes),
            gib(self.capacity_bytes)
        )
    }
}

impl ResidencyStats {
    /// `hits / (hits + misses)`; 0 before any use.
    pub fn hit_rate(&self) -> f64 {
        let uses = self.hits + self.misses;
        if uses == 0 {
            0.0
        } else {
            self.hits as f64 / uses as f64
        }
    }
}

/// One registered expert: its matrices (kept alive here, so that their
/// pages stay mapped while the residency can advise on them) and their
/// byte ranges.
struct Entry {
    _tensors: Vec<Tensor>,
    /// `(address, length)` of each matrix.
    ranges: Vec<(usize, usize)>,
    bytes: u64,
    /// When last used (`Some`: resident).
    used_at: Option<u64>,
}

#[derive(Default)]
struct State {
    capacity: u64,
    clock: u64,
    entries: HashMap<ExpertKey, Entry>,
    /// Resident experts by last use, oldest first.
    lru: BTreeMap<u64, ExpertKey>,
    stats: ResidencyStats,
}

/// The set of resident experts of a model, shared by its MoE layers
/// (cloning shares it). See the module documentation.
#[derive(Clone)]
pub struct ExpertResidency {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ExpertResidency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertResidency")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The page size, for advice on whole pages.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// The file-backed mappings of this process, `(start, end)`, from
/// `/proc/self/maps` (lines with a path that is not a pseudo-file such as
/// `[heap]`).
fn file_mappings() -> Result<Vec<(usize, usize)>> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| MoeError::io(std::path::Path::new("/proc/self/maps"), e))?;
    Ok(maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let path = fields.nth(4)?;
            if !path.starts_with('/') {
                return None;
            }
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect())
}

impl ExpertResidency {
    /// A residency keeping at most `capacity_bytes` of experts in memory.
    pub fn new(capacity_bytes: u64) -> Self {
        ExpertResidency {
            state: Arc::new(Mutex::new(State {
                capacity: capacity_bytes,
                stats: ResidencyStats {
                    capacity_bytes,
                    ..ResidencyStats::default()
                },
                ..State::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts, never memory, half
        // updated: carry on with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the matrices of `key`, not resident yet. Each must be a
    /// CPU tensor whose bytes lie in a file-backed memory map (the
    /// residency drops and re-reads their pages, which would lose the
    /// values of memory that no file backs: that is an error here).
    pub fn register(&self, key: ExpertKey, matrices: &[&Tensor]) -> Result<()> {
        let maps = file_mappings()?;
        let mut ranges = Vec::with_capacity(matrices.len());
        for m in matrices {
            if m.device() != Device::Cpu {
                return Err(MoeError::config(format!(
                    "expert {} of layer {}: mapped experts live in CPU memory maps, got a \
                     matrix on {:?}",
                    key.expert,
                    key.layer,
                    m.device()
                )));
            }
            let start = m.data_ptr() as usize;
            let len = m.numel() * m.kind().elt_size_in_bytes();
            if !m.is_contiguous() && !m.tr().is_contiguous() {
                return Err(MoeError::config(format!(
                    "expert {} of layer {}: a mapped matrix must be one dense block",
                    key.expert, key.layer
                )));
            }
            let inside = maps
                .iter()
                .any(|&(lo, hi)| lo <= start && start + len <= hi);
            if !inside {
                return Err(MoeError::config(format!(
                    "expert {} of layer {}: its matrix at {start:#x} ({len} bytes) is not in a \
                     file's memory map; only experts used from the checkpoint's files can be \
                     left out of memory",
                    key.expert, key.layer
                )));
            }
            ranges.push((start, len));
        }
        let bytes = ranges.iter().map(|&(_, len)| len as u64).sum();
        let mut state = self.lock();
        state.entries.insert(
            key,
            Entry {
                _tensors: matrices.iter().map(|m| m.shallow_clone()).collect(),
                ranges,
                bytes,
                used_at: None,
            },
        );
        Ok(())
    }

    /// Bytes of the registered expert `key` (0 if unknown).
    pub fn expert_bytes(&self, key: ExpertKey) -> u64 {
        self.lock().entries.get(&key).map_or(0, |e| e.bytes)
    }

    /// The counts so far.
    pub fn stats(&self) -> ResidencyStats {
        self.lock().stats
    }

    /// Records a use of `key` (a hit if resident, else a miss that makes it
    /// resident), evicting the least recently used others while over
    /// capacity. Unknown keys are ignored.
    pub fn use_expert(&self, key: ExpertKey) {
        let mut state = self.lock();
        let Some(was) = state.entries.get(&key).map(|e| e.used_at) else {
            return;
        };
        if was.is_some() {
            state.stats.hits += 1;
        } else {
            state.stats.misses += 1;
        }
        state.make_resident(key);
    }

    /// Forgets `key` for good (its matrices are no longer used, as after
    /// quantising them): its pages leave this process (`MADV_DONTNEED`;
    /// the page cache may keep them) and it no longer counts.
    pub fn release(&self, key: ExpertKey) {
        let mut state = self.lock();
        let Some(entry) = state.entries.remove(&key) else {
            return;
        };
        advise(&entry.ranges, libc::MADV_DONTNEED);
        if let Some(used_at) = entry.used_at {
            state.lru.remove(&used_at);
            state.stats.resident_bytes -= entry.bytes;
        }
    }

    /// Asks the kernel to read `key`'s pages in the background
    /// (`MADV_WILLNEED`) and counts it resident, unless it already is.
    pub fn prefetch(&self, key: ExpertKey) {
        let mut state = self.lock();
        let Some(entry) = state.entries.get(&key) else {
            return;
        };
        if entry.used_at.is_some() {
            return;
        }
        advise(&entry.ranges, libc::MADV_WILLNEED);
        state.stats.prefetches += 1;
        state.make_resident(key);
    }
}

impl State {
    /// `key` becomes the most recently used resident expert; others leave
    /// while over capacity (never `key` itself).
    fn make_resident(&mut self, key: ExpertKey) {
        self.clock += 1;
        let now = self.clock;
        let entry = self.entries.get_mut(&key).expect("checked by the caller");
        match entry.used_at.replace(now) {
            Some(old) => {
                self.lru.remove(&old);
            }
            None => {
                self.stats.bytes_loaded += entry.bytes;
                self.stats.resident_bytes += entry.bytes;
            }
        }
        self.lru.insert(now, key);
        while self.stats.resident_bytes > self.capacity {
            let Some((&oldest, &victim)) = self.lru.iter().next() else {
                break;
            };
            if victim == key {
                break;
            }
            self.lru.remove(&oldest);
            let entry = self.entries.get_mut(&victim).expect("listed entries exist");
            entry.used_at = None;
            advise(&entry.ranges, libc::MADV_DONTNEED);
            self.stats.resident_bytes -= entry.bytes;
            self.stats.evictions += 1;
        }
    }
}

/// `madvise(advice)` on the whole pages inside each range (a partial page
/// at either end may hold another tensor's bytes, which are left alone).
fn advise(ranges: &[(usize, usize)], advice: libc::c_int) {
    let page = page_size();
    for &(start, len) in ranges {
        let first = start.div_ceil(page) * page;
        let end = (start + len) / page * page;
        if end > first {
            // SAFETY: the range lies in a file-backed private map that the
            // entry's tensors keep alive (checked at registration). Dropping
            // its unmodified pages (DONTNEED) only makes the next read fault
            // them in from the file again; WILLNEED only starts reads.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, advice);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// A file of `n` bf16 matrices of `rows x cols`, mapped privately.
    fn mapped(n: usize, rows: i64, cols: i64) -> (std::path::PathBuf, Vec<Tensor>) {
        let path = std::env::temp_dir().join(format!(
            "moe-residency-{}-{:?}.bin",
            std::process::id(),
            std::thread::current().id()
        ));
        let bytes = n * (rows * cols) as usize * 2;
        std::fs::write(&path, vec![1u8; bytes]).unwrap();
        let whole = Tensor::from_file(
            path.to_str().unwrap(),
            false,
            Some(bytes as i64),
            (Kind::Uint8, Device::Cpu),
        );
        let per = rows * cols * 2;
        let matrices = (0..n as i64)
            .map(|i| {
                whole
                    .narrow(0, i * per, per)
                    .view_dtype(Kind::BFloat16)
                    .view([rows, cols])
            })
            .collect();
        (path, matrices)
    }

    /// The bf16 value of the bytes `0x01 0x01`.
    fn half_one() -> f32 {
        f32::from_bits(0x0101 << 16)
    }

    #[test]
    fn least_recently_used_experts_leave_first() {
        let (path, m) = mapped(4, 64, 64);
        let bytes = 64 * 64 * 2;
        let r = ExpertResidency::new(2 * bytes);
        let key = |expert| ExpertKey { layer: 0, expert };
        for (e, t) in m.iter().enumerate() {
            r.register(key(e), &[t]).unwrap();
        }
        r.use_expert(key(0)); // miss
        r.use_expert(key(1)); // miss
        r.use_expert(key(0)); // hit; 1 is now the oldest
        r.use_expert(key(2)); // miss, evicts 1
        r.use_expert(key(0)); // hit
        r.use_expert(key(1)); // miss, evicts 2
        let s = r.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (2, 4, 2));
        assert_eq!(s.resident_bytes, 2 * bytes);
        assert_eq!(s.bytes_loaded, 4 * bytes);
        assert!((s.hit_rate() - 2.0 / 6.0).abs() < 1e-12);
        // A prefetched expert is resident: its use is a hit.
        r.prefetch(key(3));
        r.use_expert(key(3));
        assert_eq!(r.stats().hits, 3);
        assert_eq!(r.stats().prefetches, 1);
        // Values survive being dropped and read again.
        let ones = m[2].to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
        assert_eq!(ones, (64 * 64) as f64 * f64::from(half_one()));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn memory_no_file_backs_is_refused() {
        let anonymous = Tensor::ones([256, 256], (Kind::BFloat16, Device::Cpu));
        let r = ExpertResidency::new(1 << 20);
        let err = r
            .register(
                ExpertKey {
                    layer: 0,
                    expert: 0,
                },
                &[&anonymous],
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("not in a file's memory map"),
            "{err}"
        );
    }
}
