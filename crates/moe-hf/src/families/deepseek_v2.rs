//! `deepseek_v2` (`DeepseekV2ForCausalLM`, V2 and V2-Lite): DeepSeek-V3's
//! attention and layer layout with a softmax router, `greedy` or
//! `group_limited_greedy` (groups scored by their best probability),
//! weights not renormalised, times `routed_scaling_factor`.

use super::rules::{self, is_moe, norm_topk_prob, ExpertDefaults, LATENT_ATTENTION};
use super::{
    field, Check, Defaults, Entry, Family, Fixed, Gates, Key, KeyDefault, Layers, Lit, Rule,
    Tensors,
};
use moe_routers::Gate;
use serde_json::{json, Value};

static EXPERTS: [Entry; 6] = rules::deepseek_experts(ExpertDefaults {
    n_routed_experts: rules::routed_experts(64).or("num_experts"),
    num_experts_per_tok: KeyDefault::Required(
        "`num_experts_per_tok` is missing: DeepSeek-V2 has no default for it",
    ),
    moe_intermediate_size: 1407,
    n_shared_experts: 2,
    first_k_dense_replace: 0,
    routed_scaling_factor: 1.0,
});

/// The router: `topk_method` `greedy` (softmax top-k) or
/// `group_limited_greedy` (with `n_group`, `topk_group`); the weights never
/// renormalised.
static ROUTER: Rule = Rule {
    read: |r, c| {
        c.router.gate = match r.value("topk_method").map(|v| (v, v.as_str())) {
            None | Some((_, Some("greedy"))) => {
                // Without a group limit the group keys do nothing.
                r.informational(&["n_group", "topk_group"]);
                Gate::TopK {
                    norm_topk_prob: false,
                }
            }
            Some((_, Some("group_limited_greedy"))) => Gate::GroupLimitedGreedy {
                norm_topk_prob: false,
                n_group: r
                    .opt_int("n_group")?
                    .ok_or_else(|| r.err("topk_method `group_limited_greedy` needs `n_group`"))?,
                topk_group: r.opt_int("topk_group")?.ok_or_else(|| {
                    r.err("topk_method `group_limited_greedy` needs `topk_group`")
                })?,
            },
            Some((v, _)) => {
                return Err(r.err(format!(
                    "`topk_method` = {v} is not supported: DeepSeek-V2 chooses by \
                     \"greedy\" or \"group_limited_greedy\""
                )))
            }
        };
        // transformers' DeepseekV2TopkRouter never renormalises, whatever
        // the key says (DeepSeek's own code did when true; its checkpoints
        // say false).
        r.informational(&["norm_topk_prob"]);
        Ok(())
    },
    write: |c, j| {
        // transformers writes `null` groups for `greedy`.
        let (method, n_group, topk_group) = match c.router.gate.groups() {
            Some((n, k)) => ("group_limited_greedy", json!(n), json!(k)),
            None => ("greedy", Value::Null, Value::Null),
        };
        j.insert("topk_method".into(), json!(method));
        j.insert("n_group".into(), n_group);
        j.insert("topk_group".into(), topk_group);
        j.insert("norm_topk_prob".into(), json!(false));
        Ok(())
    },
};

pub(crate) static FAMILY: Family = Family {
    model_type: "deepseek_v2",
    architecture: "DeepseekV2ForCausalLM",
    name: "DeepSeek-V2",
    // DeepseekV2Config keeps LlamaConfig's defaults but the vocabulary.
    defaults: Defaults {
        vocab_size: 102400,
        ..super::llama::DEFAULTS
    },
    layers: Layers {
        latent_attention: true,
        gates: Gates::TOP_K_OR_GROUP_LIMITED,
        ..rules::DEEPSEEK_MOE
    },
    keys: &[
        rules::FULL_ATTENTION,
        Entry::Table(&EXPERTS),
        Entry::Rule(&ROUTER),
        Entry::Bool(Key::new("attention_bias", field!(attention_bias), false)),
        rules::NO_MLP_BIAS,
        // RoPE on adjacent pairs of the rotary dimensions (complex
        // products), as V3's `rope_interleave`.
        Entry::Rule(&LATENT_ATTENTION),
        // The original checkpoints' keys (DeepSeek's own modeling code).
        Entry::Fixed(Fixed {
            key: "scoring_func",
            accepts: &[Lit::Str("softmax")],
            supported: "\"softmax\" scores",
            written: false,
        }),
        Entry::Table(&rules::DEEPSEEK_ORIGINALS),
    ],
    checks: &[
        Check {
            when: |c| is_moe(c) && norm_topk_prob(c),
            says: |_, _| {
                "norm_topk_prob = true; transformers' DeepSeek-V2 router never renormalises".into()
            },
        },
        rules::ROUTED_AND_UNGATED_SHARED,
        Check {
            when: |c| c.latent_attention.is_some_and(|l| !l.rope_interleave),
            says: |_, _| "rope_interleave = false; DeepSeek-V2 turns adjacent pairs".into(),
        },
    ],
    tensors: Tensors::PLAIN,
    multimodal: None,
};
