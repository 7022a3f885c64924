use crate::lfa::LfState;
use tch::Tensor;

/// What an attention layer ([`crate::CausalSelfAttention`],
/// [`crate::GroupedQueryAttention`]) keeps of the positions it has already
/// seen, so that the next positions attend to them without recomputing them
/// (incremental decoding): their keys and values, `[B, H_kv, T_past,
/// head_size]` each (after RoPE where the layer has it), and, for a layer
/// with Yuan's [`crate::LocalizedFiltering`], the filter's state (the last
/// input and the last first-convolution output). One cache per layer.
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    lf: Option<LfState>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held, `T_past`.
    pub fn len(&self) -> i64 {
        self.keys.as_ref().map_or(0, |k| k.size()[2])
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch size of the cached sequences (`None` while empty).
    pub fn batch_size(&self) -> Option<i64> {
        self.keys.as_ref().map(|k| k.size()[0])
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The cached keys, `[B, H_kv, T_past, hs]` (`None` while empty).
    pub(crate) fn keys(&self) -> Option<&Tensor> {
        self.keys.as_ref()
    }

    /// Appends `[B, H, T_new, hs]` keys and values; returns all of them.
    pub(crate) fn append(&mut self, keys: Tensor, values: Tensor) -> (Tensor, Tensor) {
        let join = |old: Option<Tensor>, new: Tensor| match old {
            Some(old) => Tensor::cat(&[old, new], 2),
            None => new,
        };
        let keys = join(self.keys.take(), keys);
        let values = join(self.values.take(), values);
        self.keys = Some(keys.shallow_clone());
        self.values = Some(values.shallow_clone());
        (keys, values)
    }

    /// The localized filter's state after the cached positions (`None` while
    /// empty, or when the layer has no filter).
    pub(crate) fn lf_state(&self) -> Option<&LfState> {
        self.lf.as_ref()
    }

    /// Replaces the localized filter's state.
    pub(crate) fn set_lf_state(&mut self, state: LfState) {
        self.lf = Some(state);
    }
}
