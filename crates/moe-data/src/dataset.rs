use moe_core::{MoeError, Result};
use tch::{Device, Kind, Tensor};

/// Which part of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The first `train_fraction` of the tokens.
    Train,
    /// The rest, for validation.
    Val,
}

/// A batch of `B` windows of `T` tokens and their next-token targets.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` int64.
    pub x: Tensor,
    /// `[B, T]` int64: `y[b, t] = x[b, t + 1]` in the corpus.
    pub y: Tensor,
}

/// A token stream split into train and validation parts (makeMoE's first
/// 90% / last 10%), held on the training device, and sampled as makeMoE's
/// `get_batch` does: `B` uniform random offsets, windows of `T + 1` tokens.
#[derive(Debug)]
pub struct Dataset {
    train: Tensor,
    val: Tensor,
    block_size: i64,
    vocab_size: i64,
}

impl Dataset {
    /// `tokens` must all be in `0..vocab_size`, and both splits must be
    /// longer than `block_size` tokens.
    pub fn new(
        tokens: &[i64],
        vocab_size: i64,
        train_fraction: f64,
        block_size: i64,
        device: Device,
    ) -> Result<Self> {
        if let Some(&id) = tokens.iter().find(|&&t| t < 0 || t >= vocab_size) {
            return Err(MoeError::TokenOutOfVocab { id, vocab_size });
        }
        let n = tokens.len() as i64;
        let n_train = (n as f64 * train_fraction) as i64;
        let n_val = n - n_train;
        if n_train <= block_size || n_val <= block_size {
            return Err(MoeError::Data(format!(
                "the corpus has {n} tokens: its train ({n_train}) and validation ({n_val}) \
                 splits must each hold at least block_size + 1 = {} tokens",
                block_size + 1
            )));
        }
        let all = Tensor::from_slice(tokens).to_device(device);
        Ok(Dataset {
            train: all.narrow(0, 0, n_train),
            val: all.narrow(0, n_train, n_val),
            block_size,
            vocab_size,
        })
    }

    /// Number of tokens in `split`.
    pub fn len(&self, split: Split) -> i64 {
        self.split(split).size()[0]
    }

    /// Context length `T` of the batches drawn.
    pub fn block_size(&self) -> i64 {
        self.block_size
    }

    /// Vocabulary size of the tokens.
    pub fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn split(&self, split: Split) -> &Tensor {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// `batch_size` random windows of `split`, drawn with libtorch's RNG on
    /// the data's device (no host round trip).
    pub fn batch(&self, split: Split, batch_size: i64) -> Batch {
        let data = self.split(split);
        let (t, device) = (self.block_size, data.device());
        let starts = Tensor::randint(self.len(split) - t, [batch_size, 1], (Kind::Int64, device));
        let offsets = starts + Tensor::arange(t, (Kind::Int64, device));
        Batch {
            x: data.take(&offsets),
            y: data.take(&(offsets + 1)),
        }
    }
}
