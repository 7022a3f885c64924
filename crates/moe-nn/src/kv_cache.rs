use crate::lfa::LfState;
use moe_core::{MoeError, Result};
use tch::Tensor;

/// What an attention layer keeps of the positions it has already seen, so
/// that the next positions attend to them without recomputing them
/// (incremental decoding). One cache per layer; it holds what the layer
/// that filled it writes:
///
/// - [`crate::CausalSelfAttention`], [`crate::GroupedQueryAttention`]: the
///   keys and values, `[B, H_kv, T_past, head_size]` each (keys after RoPE
///   where the layer has it), and, for a layer with Yuan's
///   [`crate::LocalizedFiltering`], the filter's state (the last input and
///   the last first-convolution output);
/// - [`crate::MultiHeadLatentAttention`]: the compressed latents, the
///   normalised `c_kv` `[B, T_past, kv_lora_rank]` and the rotated shared
///   RoPE key `k_pe` `[B, T_past, qk_rope_head_dim]`, from which the layer
///   recomputes its keys and values.
///
/// A layer given a cache that another kind of layer filled returns an
/// error. Per token and layer the first kind holds `2 H_kv head_size`
/// numbers ([`crate::GqaConfig::kv_cache_bytes_per_token`]), the second
/// `kv_lora_rank + qk_rope_head_dim`
/// ([`crate::MlaConfig::kv_cache_bytes_per_token`]).
///
/// A batch of prompts of different lengths is left-padded to one length;
/// [`KvCache::set_padding`] marks the padded positions, which every query
/// then ignores.
#[derive(Debug, Default)]
pub struct KvCache {
    entries: Option<Entries>,
    lf: Option<LfState>,
    /// `[B, T_pad]` bool, true at real tokens, for the first `T_pad`
    /// positions; positions after them are real.
    padding: Option<Tensor>,
}

/// The per-position tensors of a non-empty cache.
#[derive(Debug)]
enum Entries {
    /// Keys and values, `[B, H_kv, T, hs]` each.
    KeysValues { keys: Tensor, values: Tensor },
    /// MLA's normalised latents `[B, T, kv_lora_rank]` and rotated RoPE keys
    /// `[B, T, qk_rope_head_dim]`.
    Latent { latent: Tensor, k_pe: Tensor },
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held, `T_past`.
    pub fn len(&self) -> i64 {
        match &self.entries {
            None => 0,
            Some(Entries::KeysValues { keys, .. }) => keys.size()[2],
            Some(Entries::Latent { latent, .. }) => latent.size()[1],
        }
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch size of the cached sequences (`None` while empty).
    pub fn batch_size(&self) -> Option<i64> {
        self.entries.as_ref().map(|e| match e {
            Entries::KeysValues { keys, .. } => keys.size()[0],
            Entries::Latent { latent, .. } => latent.size()[0],
        })
    }

    /// Bytes of the cached per-position tensors (keys and values, or
    /// latents and RoPE keys; not the localized filter's two vectors):
    /// `B * T_past` times the layer's `kv_cache_bytes_per_token` for the
    /// cache's dtype.
    pub fn stored_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        match &self.entries {
            None => 0,
            Some(Entries::KeysValues { keys, values }) => bytes(keys) + bytes(values),
            Some(Entries::Latent { latent, k_pe }) => bytes(latent) + bytes(k_pe),
        }
    }

    /// Forgets every position (and the padding).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Marks left padding before the first positions are fed: `real` is
    /// `[B, T]` (bool, or integers as transformers' `attention_mask`, non-zero
    /// at real tokens), for the first `T` positions this cache will hold;
    /// every later position is real. Queries then attend only to real
    /// positions (and each padded position to itself, so that its row of
    /// attention weights is defined). Errors unless the cache is empty and
    /// `real` is `[B, T]` with `T >= 1`.
    pub fn set_padding(&mut self, real: &Tensor) -> Result<()> {
        if !self.is_empty() {
            return Err(MoeError::config(format!(
                "padding must be set on an empty KV cache, this one holds {} positions",
                self.len()
            )));
        }
        if real.dim() != 2 || real.size()[1] == 0 {
            return Err(MoeError::Shape {
                what: "padding mask".into(),
                expected: "[B, T] with T >= 1, true (non-zero) at real tokens".into(),
                got: real.size(),
            });
        }
        self.padding = Some(real.ne(0));
        Ok(())
    }

    /// The padding mask set by [`KvCache::set_padding`], `[B, T_pad]` bool.
    pub fn padding(&self) -> Option<&Tensor> {
        self.padding.as_ref()
    }

    /// Which of `len` key positions are real, `[B, len]` bool (`None`
    /// without padding): the padding mask, cut or extended with `true`s.
    /// Errors when the padding was set for another batch size than `batch`.
    pub(crate) fn key_mask(&self, batch: i64, len: i64) -> Result<Option<Tensor>> {
        let Some(real) = &self.padding else {
            return Ok(None);
        };
        let (b, t) = (real.size()[0], real.size()[1]);
        if b != batch {
            return Err(MoeError::Shape {
                what: "attention input with a padded KV cache".into(),
                expected: format!("batch size {b}, the padding mask's"),
                got: vec![batch],
            });
        }
        Ok(Some(if len <= t {
            real.narrow(1, 0, len)
        } else {
            let rest = Tensor::ones([b, len - t], (tch::Kind::Bool, real.device()));
            Tensor::cat(&[real, &rest], 1)
        }))
    }

    /// The cached keys, `[B, H_kv, T_past, hs]` (`None` while empty, or when
    /// the cache holds MLA latents).
    pub(crate) fn keys(&self) -> Option<&Tensor> {
        match &self.entries {
            Some(Entries::KeysValues { keys, .. }) => Some(keys),
            _ => None,
        }
    }

    /// The cached latents and RoPE keys (`None` while empty, or when the
    /// cache holds keys and values).
    pub(crate) fn latent(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.entries {
            Some(Entries::Latent { latent, k_pe }) => Some((latent, k_pe)),
            _ => None,
        }
    }

    /// Errors unless the cache is empty or holds keys and values.
    pub(crate) fn check_holds_keys_values(&self) -> Result<()> {
        match self.entries {
            Some(Entries::Latent { .. }) => Err(MoeError::config(
                "this KV cache holds Multi-head Latent Attention latents, not the keys and values \
                 of this layer",
            )),
            _ => Ok(()),
        }
    }

    /// Errors unless the cache is empty or holds MLA latents.
    pub(crate) fn check_holds_latent(&self) -> Result<()> {
        match self.entries {
            Some(Entries::KeysValues { .. }) => Err(MoeError::config(
                "this KV cache holds keys and values, not the Multi-head Latent Attention latents \
                 of this layer",
            )),
            _ => Ok(()),
        }
    }

    /// Appends `[B, H, T_new, hs]` keys and values; returns all of them.
    /// Errors (and changes nothing) when the cache holds latents.
    pub(crate) fn append(&mut self, keys: Tensor, values: Tensor) -> Result<(Tensor, Tensor)> {
        self.check_holds_keys_values()?;
        let (keys, values) = match self.entries.take() {
            Some(Entries::KeysValues {
                keys: old_keys,
                values: old_values,
            }) => (
                Tensor::cat(&[old_keys, keys], 2),
                Tensor::cat(&[old_values, values], 2),
            ),
            _ => (keys, values),
        };
        self.entries = Some(Entries::KeysValues {
            keys: keys.shallow_clone(),
            values: values.shallow_clone(),
        });
        Ok((keys, values))
    }

    /// Appends `[B, T_new, r]` latents and `[B, T_new, d_r]` RoPE keys;
    /// returns all of them. Errors (and changes nothing) when the cache
    /// holds keys and values.
    pub(crate) fn append_latent(
        &mut self,
        latent: Tensor,
        k_pe: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.check_holds_latent()?;
        let (latent, k_pe) = match self.entries.take() {
            Some(Entries::Latent {
                latent: old_latent,
                k_pe: old_k_pe,
            }) => (
                Tensor::cat(&[old_latent, latent], 1),
                Tensor::cat(&[old_k_pe, k_pe], 1),
            ),
            _ => (latent, k_pe),
        };
        self.entries = Some(Entries::Latent {
            latent: latent.shallow_clone(),
            k_pe: k_pe.shallow_clone(),
        });
        Ok((latent, k_pe))
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
