use tch::Tensor;

/// The keys and values of the positions a [`crate::CausalSelfAttention`]
/// layer has already seen, `[B, H, T_past, head_size]` each, so that the next
/// positions attend to them without recomputing them (incremental decoding).
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held, `T_past`.
    pub fn len(&self) -> i64 {
        self.keys.as_ref().map_or(0, |k| k.size()[2])
    }

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
}
