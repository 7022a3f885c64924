//! Which tensor of a Hugging Face checkpoint holds which of the decoder's
//! variables, per family and expert layout.

use crate::families::{ExpertTensors, Tensors};
use crate::HfFamily;
use moe_models::DecoderConfig;

/// How the routed experts of an MoE layer are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExpertLayout {
    /// One set of linear layers per expert, as the Hub's checkpoints hold
    /// them and transformers writes them: Mixtral's
    /// `block_sparse_moe.experts.N.{w1,w3,w2}.weight` (gate, up, down),
    /// the others' `mlp.experts.N.{gate,up,down}_proj.weight`.
    #[default]
    PerExpert,
    /// transformers 5's fused parameters of `MixtralExperts` and its
    /// relatives: `mlp.experts.gate_up_proj` `[E, 2I, H]` (the gate's `I`
    /// rows first, then the up projection's) and `mlp.experts.down_proj`
    /// `[E, H, I]`, each expert's slice laid out as an `nn.Linear` weight
    /// (`[out, in]`); Mixtral's router is then `mlp.gate.weight`.
    Packed,
}

/// Where (part of) a checkpoint tensor goes in one variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The tensor is the variable.
    Same,
    /// The tensor is the variable transposed (2-D).
    Transposed,
    /// The tensor is expert `e` of a stacked variable `[E, a, b]`,
    /// transposed: `hf = var[e]^T`, `[b, a]` (an `nn.Linear` weight of one
    /// expert against our `x @ w` layout).
    ExpertTransposed(i64),
    /// Rows `offset..offset + b` of dimension 1 of a packed tensor
    /// `[E, rows, a]` are the stacked variable `[E, a, b]` with its last two
    /// dimensions swapped: `hf[:, offset..offset + b, :] = var.transpose(1, 2)`.
    PackedRows {
        /// First row of dimension 1.
        offset: i64,
    },
    /// Every other entry of the last dimension, from `offset` (0 or 1), is
    /// the variable: `hf[..., offset::2] = var` (gpt-oss's `gate_up_proj`
    /// `[E, H, 2I]` and its bias `[E, 2I]`: gate columns even, up odd).
    Interleaved {
        /// First entry, 0 or 1.
        offset: i64,
    },
    /// Entries `offset..offset + b` of the last dimension are the variable
    /// (`[..., b]`): `hf[..., offset..offset + b] = var` (Llama 4's
    /// `gate_up_proj` `[E, H, 2I]`: the gate's `I` columns, then the up
    /// projection's).
    Columns {
        /// First entry of the last dimension.
        offset: i64,
    },
}

impl Placement {
    /// Whether an expert bank's matrix stored this way is, per expert, a
    /// view of the file in the bank's orientation (an expert's transposed
    /// `nn.Linear` weight, or packed rows), from which the experts can
    /// compute in place. Interleaved columns (gpt-oss), halves of the
    /// columns (Llama 4) and a whole stored bank (its rows in the file's
    /// order) are copied instead.
    pub(crate) fn views_experts(self) -> bool {
        matches!(
            self,
            Placement::ExpertTransposed(_) | Placement::PackedRows { .. }
        )
    }
}

/// A routed expert bank's variable (not a shared expert's).
pub(crate) fn is_routed_bank(var: &str) -> bool {
    var.contains(".mlp.experts.")
}

/// Whether the routed experts' matrices of a `family` checkpoint for
/// `config` can stay in its files, in every layout the reader may meet
/// ([`Placement::views_experts`]).
pub(crate) fn experts_stay_in_files(family: HfFamily, config: &DecoderConfig) -> bool {
    let matrix = |var: &str| ["w_in", "w_gate", "w_out"].iter().any(|m| var.ends_with(m));
    groups(family, config)
        .iter()
        .flat_map(|g| &g.alternatives)
        .flat_map(|a| &a.tensors)
        .flat_map(|t| &t.parts)
        .filter(|part| is_routed_bank(&part.var) && matrix(&part.var))
        .all(|part| part.placement.views_experts())
}

/// One of the variables a checkpoint tensor fills, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPart {
    /// The variable's path in the `VarStore` (`model.layers.0.mlp.experts.w_gate`).
    pub var: String,
    /// How the tensor's data maps onto it.
    pub placement: Placement,
}

/// A tensor of the checkpoint and the variables it fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    /// The tensor's name in the safetensors file.
    pub name: String,
    /// The variables (one, or two for a packed `gate_up_proj`).
    pub parts: Vec<TensorPart>,
}

/// Ways the checkpoint may hold the same variables; a reader takes the
/// first whose tensors are all present.
#[derive(Debug, Clone)]
pub(crate) struct Alternative {
    /// The expert layout it belongs to (`None`: any).
    pub layout: Option<ExpertLayout>,
    pub tensors: Vec<HfTensor>,
}

/// A set of variables and the alternatives that hold them.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub alternatives: Vec<Alternative>,
}

impl Group {
    fn one(tensors: Vec<HfTensor>) -> Self {
        Group {
            alternatives: vec![Alternative {
                layout: None,
                tensors,
            }],
        }
    }

    /// The alternative a writer of `layout` uses.
    pub fn for_layout(&self, layout: ExpertLayout) -> &Alternative {
        self.alternatives
            .iter()
            .find(|a| a.layout.is_none_or(|l| l == layout))
            .unwrap_or(&self.alternatives[0])
    }
}

fn same(name: impl Into<String>, var: impl Into<String>) -> HfTensor {
    HfTensor {
        name: name.into(),
        parts: vec![TensorPart {
            var: var.into(),
            placement: Placement::Same,
        }],
    }
}

/// Our stacked bank's variables, in the order gate, up, down.
const BANK: [&str; 3] = ["w_gate", "w_in", "w_out"];

/// One SwiGLU MLP stored as `prefix.{gate,up,down}_proj.weight`, held as
/// expert 0 of a stacked bank `ours.{w_gate,w_in,w_out}` (Qwen2-MoE's and
/// DeepSeek's shared experts).
fn mlp_as_expert(prefix: &str, ours: &str) -> Vec<HfTensor> {
    ["gate_proj", "up_proj", "down_proj"]
        .iter()
        .zip(BANK)
        .map(|(hf, var)| HfTensor {
            name: format!("{prefix}.{hf}.weight"),
            parts: vec![TensorPart {
                var: format!("{ours}.{var}"),
                placement: Placement::ExpertTransposed(0),
            }],
        })
        .collect()
}

/// The parameters of one attention layer, named alike here and in the
/// checkpoint (`q_proj.weight`, ...): grouped-query attention's
/// projections, q/k/v biases with `attention_bias` (Qwen2) and QK-norms
/// (OLMoE), `o_proj.bias` and `sinks` (gpt-oss); or Multi-head Latent
/// Attention's (DeepSeek-V2/V3), with biases on
/// `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` under `attention_bias`.
fn attention_params(c: &DecoderConfig) -> Vec<String> {
    let mut params = Vec::new();
    let mut layer = |name: &str, bias: bool| {
        params.push(format!("{name}.weight"));
        if bias {
            params.push(format!("{name}.bias"));
        }
    };
    let bias = c.attention_bias;
    match c.latent_attention {
        Some(latent) => {
            if latent.q_lora_rank.is_some() {
                layer("q_a_proj", bias);
                layer("q_a_layernorm", false);
                layer("q_b_proj", false);
            } else {
                layer("q_proj", false);
            }
            layer("kv_a_proj_with_mqa", bias);
            layer("kv_a_layernorm", false);
            layer("kv_b_proj", false);
            layer("o_proj", bias);
        }
        None => {
            for proj in ["q_proj", "k_proj", "v_proj"] {
                layer(proj, bias);
            }
            layer("o_proj", c.o_proj_bias);
            // Llama 4's L2 QK-norm has no weights.
            if matches!(c.qk_norm, moe_nn::QkNorm::Projection | moe_nn::QkNorm::Head) {
                layer("q_norm", false);
                layer("k_norm", false);
            }
        }
    }
    if c.attention_sinks {
        params.push("sinks".into());
    }
    params
}

/// The experts of MoE layer `i`, per expert.
fn per_expert(t: &Tensors, i: i64, num_experts: i64) -> Vec<HfTensor> {
    let prefix = format!("model.layers.{i}.{}.experts", t.per_expert_module);
    let ours = format!("model.layers.{i}.mlp.experts");
    (0..num_experts)
        .flat_map(|e| {
            let (prefix, ours) = (&prefix, &ours);
            t.projections
                .iter()
                .zip(BANK)
                .map(move |(hf, var)| HfTensor {
                    name: format!("{prefix}.{e}.{hf}.weight"),
                    parts: vec![TensorPart {
                        var: format!("{ours}.{var}"),
                        placement: Placement::ExpertTransposed(e),
                    }],
                })
        })
        .collect()
}

/// `{hf}.gate_up_proj`: the gate and up projections of the experts
/// `ours` in one tensor, gate half first, each half `h` wide and lying
/// where `placement` of its offset says.
fn gate_up(hf: &str, ours: &str, h: i64, placement: fn(i64) -> Placement) -> HfTensor {
    let part = |var: &str, offset: i64| TensorPart {
        var: format!("{ours}.{var}"),
        placement: placement(offset),
    };
    HfTensor {
        name: format!("{hf}.gate_up_proj"),
        parts: vec![part("w_gate", 0), part("w_in", h)],
    }
}

/// The experts of MoE layer `i`, packed (transformers 5); `h` the expert width.
fn packed(i: i64, h: i64) -> Vec<HfTensor> {
    let experts = format!("model.layers.{i}.mlp.experts");
    let rows = |offset| Placement::PackedRows { offset };
    vec![
        gate_up(&experts, &experts, h, rows),
        HfTensor {
            name: format!("{experts}.down_proj"),
            parts: vec![TensorPart {
                var: format!("{experts}.w_out"),
                placement: rows(0),
            }],
        },
    ]
}

/// MoE layer `i` in one fused layout (gpt-oss's): the biased router
/// (`router`, gpt-oss's `mlp.router`), the experts fused with gate and up
/// columns interleaved (`gate_up_proj [E, H, 2I]`, already in our `x @ w`
/// orientation), `down_proj [E, I, H]`, and their biases.
fn fused_interleaved_mlp(router: &str, i: i64) -> Vec<HfTensor> {
    let mlp = format!("model.layers.{i}.mlp");
    let router = format!("model.layers.{i}.{router}");
    let interleaved = |name: &str, gate: &str, up: &str| HfTensor {
        name: format!("{mlp}.experts.{name}"),
        parts: [(gate, 0), (up, 1)]
            .iter()
            .map(|&(var, offset)| TensorPart {
                var: format!("{mlp}.experts.{var}"),
                placement: Placement::Interleaved { offset },
            })
            .collect(),
    };
    vec![
        same(
            format!("{router}.weight"),
            format!("{mlp}.router.gate.weight"),
        ),
        same(format!("{router}.bias"), format!("{mlp}.router.gate.bias")),
        interleaved("gate_up_proj", "w_gate", "w_in"),
        interleaved("gate_up_proj_bias", "b_gate", "b_in"),
        same(
            format!("{mlp}.experts.down_proj"),
            format!("{mlp}.experts.w_out"),
        ),
        same(
            format!("{mlp}.experts.down_proj_bias"),
            format!("{mlp}.experts.b_out"),
        ),
    ]
}

/// The routed experts of MoE layer `i` fused with gate and up halves
/// (Llama 4's `experts.gate_up_proj [E, H, 2I]` and `experts.down_proj
/// [E, I, H]`, in our `x @ w` orientation) under `module`; `h` the expert
/// width.
fn fused_halves(module: &str, i: i64, h: i64) -> Vec<HfTensor> {
    let hf = format!("model.layers.{i}.{module}.experts");
    let ours = format!("model.layers.{i}.mlp.experts");
    let columns = |offset| Placement::Columns { offset };
    vec![
        gate_up(&hf, &ours, h, columns),
        same(format!("{hf}.down_proj"), format!("{ours}.w_out")),
    ]
}

/// The groups of tensors of a `family` checkpoint for a decoder `config`:
/// embeddings, every layer's norms, attention and feed-forward network, the
/// final norm and the untied head.
pub(crate) fn groups(family: HfFamily, c: &DecoderConfig) -> Vec<Group> {
    let t = &family.table().tensors;
    let mut groups = vec![Group::one(vec![same(
        "model.embed_tokens.weight",
        "model.embed_tokens.weight",
    )])];
    for i in 0..c.num_hidden_layers {
        let layer = format!("model.layers.{i}");
        let mut plain = vec![
            same(
                format!("{layer}.input_layernorm.weight"),
                format!("{layer}.input_layernorm.weight"),
            ),
            same(
                format!("{layer}.post_attention_layernorm.weight"),
                format!("{layer}.post_attention_layernorm.weight"),
            ),
        ];
        plain.extend(
            attention_params(c)
                .into_iter()
                .map(|param| format!("{layer}.self_attn.{param}"))
                .map(|name| same(&name, &name)),
        );
        let mlp = format!("{layer}.mlp");
        if !c.is_moe_layer(i) {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                plain.push(same(
                    format!("{layer}.{}.{proj}.weight", t.mlp_module),
                    format!("{mlp}.{proj}.weight"),
                ));
            }
            groups.push(Group::one(plain));
            continue;
        }
        if t.experts == ExpertTensors::FusedInterleaved {
            // One layout: the hub's and transformers' files alike.
            plain.extend(fused_interleaved_mlp(t.router[0], i));
            groups.push(Group::one(plain));
            continue;
        }
        // The router: Mixtral's per-expert checkpoints name it
        // `block_sparse_moe.gate`, transformers 5's packed ones `mlp.gate`.
        let router = format!("{mlp}.router.gate.weight");
        let [per_expert_router, packed_router] = t.router;
        if per_expert_router == packed_router {
            plain.push(same(format!("{layer}.{per_expert_router}.weight"), &router));
        } else {
            groups.push(Group {
                alternatives: vec![
                    Alternative {
                        layout: Some(ExpertLayout::PerExpert),
                        tensors: vec![same(format!("{layer}.{per_expert_router}.weight"), &router)],
                    },
                    Alternative {
                        layout: Some(ExpertLayout::Packed),
                        tensors: vec![same(format!("{layer}.{packed_router}.weight"), &router)],
                    },
                ],
            });
        }
        if matches!(c.router.gate, moe_routers::Gate::SigmoidAuxFree { .. }) {
            // DeepSeek-V3's balancing bias.
            plain.push(same(
                format!("{mlp}.gate.e_score_correction_bias"),
                format!("{mlp}.router.expert_bias"),
            ));
        }
        if c.shared_experts().is_some() {
            let hf = format!("{layer}.{}", t.shared_experts);
            plain.extend(mlp_as_expert(&hf, &format!("{mlp}.shared_experts")));
            if let Some(gate) = t.shared_expert_gate {
                let name = format!("{layer}.{gate}.weight");
                plain.push(same(&name, &name));
            }
        }
        if t.experts == ExpertTensors::FusedHalves {
            // One layout: the hub's and transformers' files alike.
            plain.extend(fused_halves(t.mlp_module, i, c.expert_width()));
            groups.push(Group::one(plain));
            continue;
        }
        groups.push(Group::one(plain));
        groups.push(Group {
            alternatives: vec![
                Alternative {
                    layout: Some(ExpertLayout::PerExpert),
                    tensors: per_expert(t, i, c.num_local_experts),
                },
                Alternative {
                    layout: Some(ExpertLayout::Packed),
                    tensors: packed(i, c.expert_width()),
                },
            ],
        });
    }
    let mut last = vec![same("model.norm.weight", "model.norm.weight")];
    if !c.tie_word_embeddings {
        last.push(same("lm_head.weight", "lm_head.weight"));
    }
    groups.push(Group::one(last));
    if !t.prefix.is_empty() {
        for tensor in groups
            .iter_mut()
            .flat_map(|g| &mut g.alternatives)
            .flat_map(|a| &mut a.tensors)
        {
            tensor.name.insert_str(0, t.prefix);
        }
    }
    groups
}

/// The tensors a checkpoint of `family` written in `layout` holds for a
/// decoder `config`, each with the variables it fills: the name mapping of
/// [`crate::save_pretrained_with`] and, for either layout,
/// [`crate::from_pretrained`].
pub fn tensor_map(family: HfFamily, config: &DecoderConfig, layout: ExpertLayout) -> Vec<HfTensor> {
    groups(family, config)
        .iter()
        .flat_map(|g| g.for_layout(layout).tensors.clone())
        .collect()
}

/// Whether a checkpoint tensor that no variable takes may be skipped:
/// rotary tables (`...rotary_emb.inv_freq`, recomputed), with tied
/// embeddings a stored `lm_head.weight` (transformers ties it to the
/// embeddings too), another tower of a multimodal checkpoint (Llama 4's
/// `vision_model.*`, `multi_modal_projector.*`), and DeepSeek-V3's and
/// GLM-4.5's multi-token-prediction layers
/// (`model.layers.N.*` past the last decoder layer, which the causal LM does
/// not run; transformers skips them too).
pub(crate) fn ignorable(name: &str, family: HfFamily, config: &DecoderConfig) -> bool {
    let t = &family.table().tensors;
    let name = name.strip_prefix(t.prefix).unwrap_or(name);
    let past_last_layer = || {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<i64>().ok())
            .is_some_and(|i| i >= config.num_hidden_layers)
    };
    name.ends_with("rotary_emb.inv_freq")
        || t.other_towers.iter().any(|tower| name.starts_with(tower))
        || (config.tie_word_embeddings && name == "lm_head.weight")
        || (t.extra_layers_skipped && past_last_layer())
}
