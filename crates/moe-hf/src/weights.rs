//! safetensors weights: read through a memory map and checked whole before
//! any variable changes; written with the safetensors crate.

use crate::names::{
    groups, ignorable, is_routed_bank, tensor_map, ExpertLayout, HfTensor, Placement, TensorPart,
};
use crate::HfFamily;
use memmap2::{Advice, Mmap, UncheckedAdvice};
use moe_core::{safetensors_dtype, write_safetensors};
use moe_core::{MoeError, Result};
use moe_models::DecoderConfig;
use safetensors::tensor::{Dtype, TensorView, View};
use safetensors::SafeTensors;
use serde_json::Value;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// The single-file weights of a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights (`weight_map`: tensor name -> shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Problems listed in one error message before "...".
const SHOWN_PROBLEMS: usize = 8;

/// A memory-mapped safetensors file.
struct Mapped {
    path: PathBuf,
    map: Mmap,
}

/// The weight files of a folder: `model.safetensors`, or the shards of
/// `model.safetensors.index.json` with its `weight_map`.
struct Files {
    /// The file errors about the whole checkpoint name.
    main: PathBuf,
    mapped: Vec<Mapped>,
    /// Tensor name -> index in `mapped`, from the index file.
    index: Option<HashMap<String, usize>>,
}

fn checkpoint_err(path: &Path, reason: impl Into<String>) -> MoeError {
    MoeError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Maps `path` into memory.
///
/// The map stays valid while the file is unchanged: as with every reader
/// of memory-mapped checkpoints (transformers, candle), a file rewritten in
/// place while it is being loaded is undefined behaviour. Writers here
/// (and transformers') replace files by renaming, which does not affect a
/// map of the old file.
fn map_file(path: &Path, what: &str) -> Result<Mapped> {
    let file =
        File::open(path).map_err(|e| checkpoint_err(path, format!("cannot open {what}: {e}")))?;
    // SAFETY: read-only map of a file we do not modify; see above.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| checkpoint_err(path, format!("cannot map {what} into memory: {e}")))?;
    Ok(Mapped {
        path: path.to_path_buf(),
        map,
    })
}

/// Opens `dir/model.safetensors`, else the shards of
/// `dir/model.safetensors.index.json`.
fn open_files(dir: &Path) -> Result<Files> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(Files {
            main: single.clone(),
            mapped: vec![map_file(&single, "the weights")?],
            index: None,
        });
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        let other = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
            .iter()
            .find(|f| dir.join(f).is_file())
            .map(|f| format!(" (found {f}: convert it to safetensors first)"))
            .unwrap_or_default();
        return Err(checkpoint_err(
            &single,
            format!("no weights: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists{other}"),
        ));
    }
    let text = std::fs::read_to_string(&index_path)
        .map_err(|e| checkpoint_err(&index_path, format!("cannot read the index: {e}")))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| checkpoint_err(&index_path, format!("not valid JSON: {e}")))?;
    let Some(weight_map) = json.get("weight_map").and_then(Value::as_object) else {
        return Err(checkpoint_err(
            &index_path,
            "the index has no `weight_map` object (tensor name -> shard file)",
        ));
    };
    let mut shards: BTreeMap<String, usize> = BTreeMap::new();
    let mut names = Vec::with_capacity(weight_map.len());
    for (name, file) in weight_map {
        let Some(file) = file.as_str() else {
            return Err(checkpoint_err(
                &index_path,
                format!("`weight_map` entry of tensor `{name}` must be a file name, got {file}"),
            ));
        };
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(checkpoint_err(
                &index_path,
                format!(
                    "shard `{file}` of tensor `{name}` must be a file in the checkpoint folder"
                ),
            ));
        }
        let next = shards.len();
        let i = *shards.entry(file.to_string()).or_insert(next);
        names.push((name.clone(), i));
    }
    let mut by_index: Vec<(usize, String)> = shards.into_iter().map(|(f, i)| (i, f)).collect();
    by_index.sort();
    let mapped = by_index
        .iter()
        .map(|(_, file)| {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(checkpoint_err(
                    &path,
                    format!("shard listed in {INDEX_FILE} does not exist"),
                ));
            }
            map_file(&path, "the shard")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Files {
        main: index_path,
        mapped,
        index: Some(names.into_iter().collect()),
    })
}

/// Parses the header of a mapped file; a corrupt or truncated file is an
/// error naming it and, for a truncation, the first tensor cut off.
fn parse(m: &Mapped) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(&m.map).map_err(|e| checkpoint_err(&m.path, diagnose(&m.map, &e)))
}

/// Every tensor of a folder's weight files, `(dtype, element count)`, read
/// from their headers alone: the files are mapped, and only the pages of
/// their headers are read.
pub(crate) fn tensor_sizes(dir: &Path) -> Result<Vec<TensorSize>> {
    let files = open_files(dir)?;
    let mut sizes = Vec::new();
    for m in &files.mapped {
        for (name, view) in parse(m)?.iter() {
            let elements: usize = view.shape().iter().product();
            let mxfp4 = view.dtype() == Dtype::U8;
            sizes.push(TensorSize {
                name: name.to_string(),
                dtype: view.dtype(),
                // MXFP4: two values a byte of `*_blocks`; `*_scales` scale them.
                params: match (mxfp4, name.ends_with("_blocks"), name.ends_with("_scales")) {
                    (true, true, _) => 2 * elements,
                    (true, _, true) => 0,
                    _ => elements,
                },
                bytes: elements * view.dtype().bitsize() / 8,
            });
        }
    }
    Ok(sizes)
}

/// A tensor of a checkpoint's files, from its header.
pub(crate) struct TensorSize {
    /// Its name in the file.
    pub name: String,
    pub dtype: Dtype,
    /// The parameters it holds (an MXFP4 byte holds two).
    pub params: usize,
    /// Its bytes in the file.
    pub bytes: usize,
}

/// Why `bytes` is not a safetensors file, as precisely as the header allows.
fn diagnose(bytes: &[u8], e: &safetensors::SafeTensorError) -> String {
    let generic = format!("not a valid safetensors file (corrupt or truncated): {e}");
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return format!(
            "truncated: {} bytes, shorter than the 8-byte header length",
            bytes.len()
        );
    };
    let header_end = 8u64.saturating_add(len);
    if header_end > bytes.len() as u64 {
        return format!(
            "truncated or corrupt: the header claims {len} bytes but the file has only {} after \
             the length field",
            bytes.len() - 8
        );
    }
    let Ok(header) = serde_json::from_slice::<Value>(&bytes[8..header_end as usize]) else {
        return generic;
    };
    let Some(entries) = header.as_object() else {
        return generic;
    };
    let available = bytes.len() as u64 - header_end;
    let mut cut: Vec<(u64, &String, u64)> = entries
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(name, info)| {
            let offsets = info.get("data_offsets")?.as_array()?;
            let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
            (end > available).then_some((start, name, end))
        })
        .collect();
    cut.sort();
    match cut.first() {
        Some((start, name, end)) => format!(
            "truncated: tensor `{name}` needs bytes {start}..{end} of the data section, which \
             holds only {available} bytes ({} tensor(s) cut off)",
            cut.len()
        ),
        None => generic,
    }
}

/// The element type of a safetensors dtype the model's weights can take.
fn float_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// The safetensors dtype of a floating-point kind (the kinds weights are
/// saved in).
pub(crate) fn dtype_of(kind: Kind) -> Option<Dtype> {
    safetensors_dtype(kind)
        .filter(|d| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64))
}

/// The shape a checkpoint tensor must have to fill its variables, or why
/// the variables do not fit the mapping (a config the family cannot hold).
fn expected_shape(
    t: &HfTensor,
    vars: &HashMap<String, Tensor>,
) -> std::result::Result<Vec<i64>, String> {
    let var = |name: &str| {
        vars.get(name)
            .map(Tensor::size)
            .ok_or_else(|| format!("the model has no variable `{name}` for tensor `{}`", t.name))
    };
    let first = &t.parts[0];
    let s = var(&first.var)?;
    match first.placement {
        Placement::Same => Ok(s),
        Placement::Transposed if s.len() == 2 => Ok(vec![s[1], s[0]]),
        Placement::ExpertTransposed(e) if s.len() == 3 && e < s[0] => Ok(vec![s[2], s[1]]),
        Placement::PackedRows { .. } if s.len() == 3 => {
            let mut rows = 0;
            for part in &t.parts {
                let p = var(&part.var)?;
                match part.placement {
                    Placement::PackedRows { offset }
                        if offset == rows && p.len() == 3 && p[0] == s[0] && p[1] == s[1] =>
                    {
                        rows += p[2];
                    }
                    _ => {
                        return Err(format!(
                            "variables {:?} cannot be packed into `{}`",
                            t.parts, t.name
                        ))
                    }
                }
            }
            Ok(vec![s[0], rows, s[1]])
        }
        Placement::Columns { .. } if !s.is_empty() => {
            let lead = &s[..s.len() - 1];
            let mut columns = 0;
            for part in &t.parts {
                let p = var(&part.var)?;
                match part.placement {
                    Placement::Columns { offset }
                        if offset == columns && p.len() == s.len() && p[..p.len() - 1] == *lead =>
                    {
                        columns += p[p.len() - 1];
                    }
                    _ => {
                        return Err(format!(
                            "variables {:?} cannot be laid side by side in `{}`",
                            t.parts, t.name
                        ))
                    }
                }
            }
            Ok([lead, &[columns]].concat())
        }
        Placement::Interleaved { .. } if !s.is_empty() => {
            let fits = t.parts.len() == 2
                && t.parts.iter().enumerate().all(|(i, part)| {
                    part.placement == Placement::Interleaved { offset: i as i64 }
                        && vars.get(&part.var).map(Tensor::size).as_ref() == Some(&s)
                });
            if !fits {
                return Err(format!(
                    "variables {:?} cannot be interleaved into `{}`",
                    t.parts, t.name
                ));
            }
            let mut shape = s.clone();
            *shape.last_mut().expect("not empty") *= 2;
            Ok(shape)
        }
        _ => Err(format!(
            "variable `{}` of shape {s:?} cannot take tensor `{}` as {:?}",
            first.var, t.name, first.placement
        )),
    }
}

/// Every variable of `vars` must be filled by exactly one part of `tensors`.
fn check_coverage<'a>(
    family: HfFamily,
    tensors: impl Iterator<Item = &'a HfTensor>,
    vars: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut seen: HashSet<&str> = HashSet::new();
    for t in tensors {
        for part in &t.parts {
            if !vars.contains_key(&part.var) {
                return Err(MoeError::config(format!(
                    "model_type `{family}`: tensor `{}` fills variable `{}`, which the model \
                     does not have",
                    t.name, part.var
                )));
            }
            seen.insert(&part.var);
        }
    }
    let mut left: Vec<&String> = vars.keys().filter(|k| !seen.contains(k.as_str())).collect();
    left.sort();
    match left.first() {
        None => Ok(()),
        Some(_) => Err(MoeError::config(format!(
            "model_type `{family}` has no tensor for the variable(s) {left:?}: the model's config \
             has a part the family cannot express"
        ))),
    }
}

/// Reads the weights of `dir` (`model.safetensors` or a sharded index)
/// into the variables of `vs`, which hold a decoder of `config`, named as a
/// `family` checkpoint names them in either expert layout
/// ([`ExpertLayout`]).
///
/// Everything is checked before any variable changes: every file parses
/// (a truncated or corrupt file names the file and the first tensor cut
/// off), the index and its shards agree, every tensor the model needs is
/// there with the right shape and a floating-point dtype (F32, F16, BF16,
/// F64), and no other tensor is (rotary `inv_freq` tables and a tied
/// `lm_head.weight` aside). Problems are one [`MoeError::Checkpoint`]
/// naming the file and listing each tensor. Then each tensor is copied
/// once from the mapped file into its variable(s), converted to the
/// variable's dtype and device.
pub fn load_weights(
    dir: &Path,
    family: HfFamily,
    config: &DecoderConfig,
    vs: &nn::VarStore,
) -> Result<LoadStats> {
    load_weights_as(dir, family, config, vs, Fill::Copy).map(|(stats, _)| stats)
}

/// How [`load_weights_as`] puts a checked tensor into its variable(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Copy into the variables' own memory (which keeps its other views).
    Copy,
    /// Where a tensor fills one whole CPU variable of its own dtype as it
    /// is stored, the variable takes the file's pages (a private,
    /// copy-on-write map that libtorch owns: [`map_tensor`]); the rest is
    /// copied. For a model built just now, whose variables have no other
    /// views. With `experts`, the routed experts' matrices are not copied
    /// into their banks either: they are returned as views of the files
    /// ([`MappedExperts`]), for banks that compute from them.
    MapWhereStored {
        /// Leave the routed experts in the files.
        experts: bool,
    },
}

/// The routed experts' matrices of a checkpoint as views of its mapped
/// files, by bank variable (`model.layers.3.mlp.experts.w_in`): one
/// `[in, out]` matrix per expert (the bank's `var[e]` orientation; the
/// file holds its transpose, an `nn.Linear` weight, so each is a
/// column-major view).
pub(crate) type MappedExperts = HashMap<String, Vec<Option<Tensor>>>;

/// What loading did with a checkpoint's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Bytes of tensors the parameters use from the memory-mapped files
    /// without a copy (file-backed pages the kernel can evict and re-read).
    pub mapped_bytes: u64,
    /// Bytes of tensors copied into parameters: converted to another
    /// dtype, moved to another device, transposed or stacked into an
    /// expert bank.
    pub copied_bytes: u64,
}

/// A checked tensor of the checkpoint and where it is.
struct Planned<'h, 'f> {
    tensor: &'h HfTensor,
    /// Index into [`Files::mapped`].
    file: usize,
    view: &'f TensorView<'f>,
}

/// [`load_weights`] with the choice of how tensors land ([`Fill`]).
pub(crate) fn load_weights_as(
    dir: &Path,
    family: HfFamily,
    config: &DecoderConfig,
    vs: &nn::VarStore,
    fill: Fill,
) -> Result<(LoadStats, MappedExperts)> {
    let files = open_files(dir)?;
    let parsed = files.mapped.iter().map(parse).collect::<Result<Vec<_>>>()?;
    let file_name = |i: usize| {
        files.mapped[i]
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut table: HashMap<&str, (usize, TensorView<'_>)> = HashMap::new();
    let mut problems: Vec<String> = Vec::new();
    for (i, st) in parsed.iter().enumerate() {
        for (name, view) in st.iter() {
            if let Some((j, _)) = table.insert(name, (i, view)) {
                problems.push(format!(
                    "tensor `{name}` is in both {} and {}",
                    file_name(j),
                    file_name(i)
                ));
            }
        }
    }
    if let Some(index) = &files.index {
        let mut listed: Vec<(&String, &usize)> = index.iter().collect();
        listed.sort();
        for (name, &i) in listed {
            match table.get(name.as_str()) {
                None => problems.push(format!(
                    "tensor `{name}` is listed in {INDEX_FILE} under {} but that shard does not \
                     hold it",
                    file_name(i)
                )),
                Some((j, _)) if *j != i => problems.push(format!(
                    "tensor `{name}` is listed under {} but is in {}",
                    file_name(i),
                    file_name(*j)
                )),
                Some(_) => {}
            }
        }
        let mut unlisted: Vec<(&str, usize)> = table
            .iter()
            .filter(|(name, _)| !index.contains_key(**name))
            .map(|(name, (i, _))| (*name, *i))
            .collect();
        unlisted.sort();
        for (name, i) in unlisted {
            problems.push(format!(
                "tensor `{name}` of {} is not listed in {INDEX_FILE}",
                file_name(i)
            ));
        }
    }
    let vars = vs.variables();
    let groups = groups(family, config);
    check_coverage(
        family,
        groups
            .iter()
            .map(|g| &g.alternatives[0])
            .flat_map(|a| &a.tensors),
        &vars,
    )?;
    let mut plan: Vec<Planned<'_, '_>> = Vec::new();
    let mut mxfp4_plan: Vec<PlannedMxfp4<'_, '_>> = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    // gpt-oss's hub files hold its experts' matrices in MXFP4: `X_blocks`
    // and `X_scales` for a tensor `X`.
    let in_mxfp4 = |name: &str| {
        family.table().tensors.mxfp4
            && table.contains_key(format!("{name}_blocks").as_str())
            && table.contains_key(format!("{name}_scales").as_str())
    };
    let held = |name: &str| table.contains_key(name) || in_mxfp4(name);
    for group in &groups {
        let present = |a: &crate::names::Alternative| {
            a.tensors.iter().filter(|t| held(t.name.as_str())).count()
        };
        let complete = group
            .alternatives
            .iter()
            .find(|a| present(a) == a.tensors.len());
        let chosen = match complete {
            Some(a) => a,
            None => {
                // Report against the alternative the file holds most of.
                let best = group
                    .alternatives
                    .iter()
                    .rev()
                    .max_by_key(|a| present(a))
                    .expect("a group has an alternative");
                let others: Vec<&str> = group
                    .alternatives
                    .iter()
                    .filter(|a| !std::ptr::eq(*a, best))
                    .filter_map(|a| a.tensors.first().map(|t| t.name.as_str()))
                    .collect();
                for t in best.tensors.iter().filter(|t| !held(t.name.as_str())) {
                    let alt = if others.is_empty() {
                        String::new()
                    } else {
                        format!(" (nor the other layout's `{}`, ...)", others.join("`, `"))
                    };
                    problems.push(format!("missing tensor `{}`{}{alt}", t.name, for_var(t)));
                }
                best
            }
        };
        for t in &chosen.tensors {
            let Some((i, view)) = table.get(t.name.as_str()) else {
                if in_mxfp4(&t.name) {
                    let blocks = format!("{}_blocks", t.name);
                    let scales = format!("{}_scales", t.name);
                    let (bi, bv) = &table[blocks.as_str()];
                    let (_, sv) = &table[scales.as_str()];
                    let expected = expected_shape(t, &vars).map_err(|reason| {
                        MoeError::config(format!("model_type `{family}`: {reason}"))
                    })?;
                    match mxfp4_shape(bv, sv) {
                        Err(why) => problems.push(format!(
                            "tensors `{blocks}` and `{scales}` in {}: {why}",
                            file_name(*bi)
                        )),
                        Ok(shape) if shape != expected => problems.push(format!(
                            "tensors `{blocks}` and `{scales}` in {} hold {shape:?}, expected \
                             {expected:?}{}",
                            file_name(*bi),
                            for_var(t)
                        )),
                        Ok(_) => mxfp4_plan.push(PlannedMxfp4 {
                            tensor: t,
                            blocks: bv,
                            scales: sv,
                        }),
                    }
                    used.insert(blocks);
                    used.insert(scales);
                }
                continue;
            };
            used.insert(t.name.clone());
            let expected = expected_shape(t, &vars)
                .map_err(|reason| MoeError::config(format!("model_type `{family}`: {reason}")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if float_kind(view.dtype()).is_none() {
                problems.push(format!(
                    "tensor `{}` in {} has dtype {:?}; the model's weights take F32, F16, BF16 or \
                     F64",
                    t.name,
                    file_name(*i),
                    view.dtype()
                ));
            } else if shape != expected {
                problems.push(format!(
                    "tensor `{}` in {} has shape {shape:?}, expected {expected:?}{}",
                    t.name,
                    file_name(*i),
                    for_var(t)
                ));
            } else {
                plan.push(Planned {
                    tensor: t,
                    file: *i,
                    view,
                });
            }
        }
    }
    let mut unexpected: Vec<(&str, usize)> = table
        .iter()
        .filter(|(name, _)| !used.contains(**name) && !ignorable(name, family, config))
        .map(|(name, (i, _))| (*name, *i))
        .collect();
    unexpected.sort();
    for (name, i) in unexpected {
        problems.push(format!("unexpected tensor `{name}` in {}", file_name(i)));
    }
    if !problems.is_empty() {
        let shown = problems.len().min(SHOWN_PROBLEMS);
        return Err(checkpoint_err(
            &files.main,
            format!(
                "the weights do not fit a model_type `{family}` decoder of this config ({} \
                 problem(s)): {}{}",
                problems.len(),
                problems[..shown].join("; "),
                if problems.len() > shown { "; ..." } else { "" }
            ),
        ));
    }
    tch::no_grad(|| {
        let (mut stats, experts) = fill_all(&plan, &vars, &files, fill)?;
        for p in &mxfp4_plan {
            stats.copied_bytes += fill_mxfp4(p, &vars)?;
        }
        Ok((stats, experts))
    })
}

/// A tensor the checkpoint holds in MXFP4 (`X_blocks`, `X_scales`).
struct PlannedMxfp4<'h, 'f> {
    tensor: &'h HfTensor,
    blocks: &'f TensorView<'f>,
    scales: &'f TensorView<'f>,
}

/// The tensor MXFP4 `blocks` (U8 `[E, R, G, 16]`) and `scales` (U8
/// `[E, R, G]`) stand for: `[E, 32 G, R]` (gpt-oss's `[E, in, out]`), or
/// what is wrong with them.
fn mxfp4_shape(
    blocks: &TensorView<'_>,
    scales: &TensorView<'_>,
) -> std::result::Result<Vec<i64>, String> {
    let b: Vec<i64> = blocks.shape().iter().map(|&d| d as i64).collect();
    let s: Vec<i64> = scales.shape().iter().map(|&d| d as i64).collect();
    if blocks.dtype() != Dtype::U8 || scales.dtype() != Dtype::U8 {
        return Err(format!(
            "MXFP4 blocks and scales are U8, got {:?} and {:?}",
            blocks.dtype(),
            scales.dtype()
        ));
    }
    if b.len() != 4 || b[3] != 16 || s.len() != 3 || b[..3] != s[..] {
        return Err(format!(
            "MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32] expected, got {b:?} \
             and {s:?}"
        ));
    }
    Ok(vec![b[0], 32 * b[2], b[1]])
}

/// The 16 E2M1 values of MXFP4's 4-bit codes (sign bit 8).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Dequantises an MXFP4 tensor into its variables (OCP Microscaling
/// Formats v1.0; transformers' `convert_moe_packed_tensors`): each byte of
/// `blocks` holds two E2M1 codes, the first in its low nibble; a block of
/// 32 values shares the scale `2^(s - 127)` of its E8M0 byte `s`;
/// `[E, out, in]` is then seen as gpt-oss's `[E, in, out]`. One expert at
/// a time, through a table of the 256 bytes' value pairs, so that only one
/// expert's f32 values are ever held besides the variables (a gpt-oss-20b
/// layer's `gate_up_proj` is 530 M values). Returns the bytes read.
fn fill_mxfp4(p: &PlannedMxfp4<'_, '_>, vars: &HashMap<String, Tensor>) -> Result<u64> {
    let shape = |v: &TensorView<'_>| v.shape().iter().map(|&d| d as i64).collect::<Vec<_>>();
    let (bs, ss) = (shape(p.blocks), shape(p.scales));
    let (experts, rows, groups) = (bs[0], bs[1], bs[2]);
    let blocks = Tensor::f_from_data_size(p.blocks.data(), &bs, Kind::Uint8)?;
    let scales = Tensor::f_from_data_size(p.scales.data(), &ss, Kind::Uint8)?;
    let pairs: Vec<f32> = (0..256)
        .flat_map(|byte| [E2M1[byte & 0x0F], E2M1[byte >> 4]])
        .collect();
    let pairs = Tensor::from_slice(&pairs).view([256, 2]);
    for e in 0..experts {
        let codes = blocks.get(e).reshape([-1]).to_kind(Kind::Int64);
        let factor = (scales.get(e).to_kind(Kind::Float) - 127.0)
            .exp2()
            .unsqueeze(-1);
        let values = (pairs.index_select(0, &codes).view([rows, groups, 32]) * factor)
            .view([1, rows, 32 * groups])
            .transpose(1, 2);
        place(&values, &p.tensor.parts, |var| vars[var].narrow(0, e, 1))?;
    }
    Ok((p.blocks.data().len() + p.scales.data().len()) as u64)
}

/// Copies `src`, a checkpoint tensor (or the rows of it that `dest` gives
/// the variables of), into the variables its `parts` name.
fn place(src: &Tensor, parts: &[TensorPart], dest: impl Fn(&str) -> Tensor) -> Result<()> {
    for part in parts {
        let var = dest(&part.var);
        let (mut dest, piece) = match part.placement {
            Placement::Same => (var, src.shallow_clone()),
            Placement::Transposed => (var, src.tr()),
            Placement::ExpertTransposed(e) => (var.select(0, e), src.tr()),
            Placement::PackedRows { offset } => {
                let rows = var.size()[2];
                (var, src.narrow(1, offset, rows).transpose(1, 2))
            }
            Placement::Interleaved { offset } => (var, src.slice(-1, offset, None, 2)),
            Placement::Columns { offset } => {
                let columns = *var.size().last().unwrap_or(&0);
                (var, src.narrow(-1, offset, columns))
            }
        };
        dest.f_copy_(&piece)?;
    }
    Ok(())
}

/// " for variable `v`" when the tensor fills variables of other names.
fn for_var(t: &HfTensor) -> String {
    let vars: Vec<&str> = t
        .parts
        .iter()
        .map(|p| p.var.as_str())
        .filter(|v| *v != t.name)
        .collect();
    if vars.is_empty() {
        String::new()
    } else {
        format!(" for `{}`", vars.join("`, `"))
    }
}

/// Puts each planned tensor into its variables ([`Fill`]). A copied
/// tensor is read through the read-only map and its pages are then dropped
/// from this process (`MADV_DONTNEED`: they stay in the page cache), so
/// that loading holds the parameters plus one tensor's pages, not the
/// parameters plus the files.
fn fill_all(
    plan: &[Planned<'_, '_>],
    vars: &HashMap<String, Tensor>,
    files: &Files,
    fill: Fill,
) -> Result<(LoadStats, MappedExperts)> {
    let mut stats = LoadStats::default();
    let mut experts = MappedExperts::new();
    let mut whole_files: Vec<Option<Tensor>> = (0..files.mapped.len()).map(|_| None).collect();
    for p in plan {
        let m = &files.mapped[p.file];
        let kind = float_kind(p.view.dtype()).expect("checked");
        let shape: Vec<i64> = p.view.shape().iter().map(|&d| d as i64).collect();
        let bytes = p.view.data();
        let offset = bytes.as_ptr() as usize - m.map.as_ptr() as usize;
        let aligned = offset.is_multiple_of(kind.elt_size_in_bytes());
        let Fill::MapWhereStored {
            experts: map_experts,
        } = fill
        else {
            copy_into(p, &shape, kind, aligned, vars, m, offset)?;
            stats.copied_bytes += bytes.len() as u64;
            continue;
        };
        let first = &p.tensor.parts[0];
        let var = &vars[&first.var];
        let mappable = var.device() == Device::Cpu && var.kind() == kind && aligned;
        // An expert bank's matrices stay column-major (the layout its
        // kernels read): gpt-oss's `down_proj`, stored as the variable but
        // row-major, is copied into it.
        let bank_matrix = is_routed_bank(&first.var) && var.dim() == 3;
        let as_stored =
            p.tensor.parts.len() == 1 && first.placement == Placement::Same && !bank_matrix;
        let expert = map_experts
            && p.tensor
                .parts
                .iter()
                .all(|part| is_routed_bank(&part.var) && part.placement.views_experts());
        if !(mappable && (as_stored || expert)) {
            copy_into(p, &shape, kind, aligned, vars, m, offset)?;
            stats.copied_bytes += bytes.len() as u64;
            continue;
        }
        let whole = match &mut whole_files[p.file] {
            Some(t) => t,
            slot => slot.insert(map_tensor(&m.path, m.map.len())?),
        };
        let mapped = whole
            .f_narrow(0, offset as i64, bytes.len() as i64)?
            .f_view_dtype(kind)?
            .f_view(shape.as_slice())?;
        stats.mapped_bytes += bytes.len() as u64;
        if as_stored && !expert {
            var.shallow_clone().f_set_data(&mapped)?;
            continue;
        }
        for part in &p.tensor.parts {
            let num_experts = vars[&part.var].size()[0];
            let slots = experts
                .entry(part.var.clone())
                .or_insert_with(|| (0..num_experts).map(|_| None).collect());
            match part.placement {
                Placement::ExpertTransposed(e) => slots[e as usize] = Some(mapped.tr()),
                Placement::PackedRows { offset } => {
                    let rows = vars[&part.var].size()[2];
                    let bank = mapped.narrow(1, offset, rows).transpose(1, 2);
                    for (e, slot) in slots.iter_mut().enumerate() {
                        *slot = Some(bank.select(0, e as i64));
                    }
                }
                Placement::Same
                | Placement::Transposed
                | Placement::Interleaved { .. }
                | Placement::Columns { .. } => {
                    unreachable!("only per-expert and packed experts are mapped")
                }
            }
        }
    }
    Ok((stats, experts))
}

/// Copies the planned tensor `p` (at `offset` of the read-only map `m`)
/// into its variables, then drops its pages from this process.
fn copy_into(
    p: &Planned<'_, '_>,
    shape: &[i64],
    kind: Kind,
    aligned: bool,
    vars: &HashMap<String, Tensor>,
    m: &Mapped,
    offset: usize,
) -> Result<()> {
    let bytes = p.view.data();
    // Ask the kernel to read the whole tensor ahead in large requests
    // instead of faulting it in page by page (a hint: failure only costs
    // speed).
    let _ = m.map.advise_range(Advice::WillNeed, offset, bytes.len());
    let src = if aligned {
        let strides = contiguous_strides(shape);
        // SAFETY: `bytes` lies in `m.map`, which outlives `src` (dropped
        // below); the pointer is aligned to the element size; the map is
        // read-only and `src` is only read.
        unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &strides, kind, Device::Cpu)? }
    } else {
        Tensor::f_from_data_size(bytes, shape, kind)?
    };
    place(&src, &p.tensor.parts, |var| vars[var].shallow_clone())?;
    drop(src);
    // SAFETY: nothing reads these pages now (`src` is gone; the parsed
    // headers lie before the data); dropping a read-only shared file
    // mapping's pages only makes a later read fault them in again.
    let _ = unsafe {
        m.map
            .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, bytes.len())
    };
    Ok(())
}

/// Row-major strides of `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The whole file at `path` as a `u8` tensor whose storage is a private,
/// copy-on-write memory map that libtorch owns (`torch.from_file(path,
/// shared=False)`): the map lives as long as any tensor viewing it, pages
/// are read from the file when first touched and can be evicted while
/// unmodified, and writes (a training step) go to private copies, never to
/// the file.
fn map_tensor(path: &Path, len: usize) -> Result<Tensor> {
    let name = path.to_str().ok_or_else(|| {
        checkpoint_err(
            path,
            "the path is not valid UTF-8, which libtorch's file maps need",
        )
    })?;
    Tensor::f_from_file(name, false, Some(len as i64), (Kind::Uint8, Device::Cpu))
        .map_err(|e| checkpoint_err(path, format!("cannot map the file into a tensor: {e}")))
}

/// A checkpoint tensor assembled from its variables when the writer asks
/// for its bytes, so that one tensor at a time is in memory.
struct Assembled {
    parts: Vec<(Tensor, Placement)>,
    kind: Kind,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The first libtorch error of any tensor (checked after writing).
    error: Rc<RefCell<Option<tch::TchError>>>,
}

impl Assembled {
    fn bytes(&self) -> std::result::Result<Vec<u8>, tch::TchError> {
        let pieces = self
            .parts
            .iter()
            .map(|(var, placement)| match placement {
                Placement::Same => Ok(var.shallow_clone()),
                Placement::Transposed => var.f_tr(),
                Placement::ExpertTransposed(e) => var.f_select(0, *e)?.f_tr(),
                Placement::PackedRows { .. } => var.f_transpose(1, 2),
                Placement::Interleaved { .. } | Placement::Columns { .. } => {
                    Ok(var.shallow_clone())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let interleaved = matches!(self.parts[0].1, Placement::Interleaved { .. });
        let whole = if pieces.len() == 1 {
            pieces.into_iter().next().expect("one piece")
        } else if interleaved {
            // [..., n] twice -> [..., n, 2] -> [..., 2n]: entries alternate.
            Tensor::f_stack(&pieces, -1)?.f_flatten(-2, -1)?
        } else if matches!(self.parts[0].1, Placement::Columns { .. }) {
            Tensor::f_cat(&pieces, -1)?
        } else {
            Tensor::f_cat(&pieces, 1)?
        };
        let whole = whole
            .f_to_device(Device::Cpu)?
            .f_to_kind(self.kind)?
            .f_contiguous()?;
        let mut bytes = vec![0u8; self.data_len()];
        whole.f_copy_data_u8(&mut bytes, whole.numel())?;
        Ok(bytes)
    }
}

impl View for Assembled {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match tch::no_grad(|| self.bytes()) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.kind.elt_size_in_bytes()
    }
}

/// Writes the variables of `vs` (a decoder of `config`) to `path` as a
/// `family` safetensors file in `layout`, each tensor in `dtype` (the
/// variable's own when `None`), with `__metadata__ {"format": "pt"}`;
/// atomically (temporary file, fsync, rename).
pub(crate) fn write_weights(
    path: &Path,
    family: HfFamily,
    config: &DecoderConfig,
    vs: &nn::VarStore,
    layout: ExpertLayout,
    dtype: Option<Kind>,
) -> Result<()> {
    let vars = vs.variables();
    let tensors = tensor_map(family, config, layout);
    check_coverage(family, tensors.iter(), &vars)?;
    let error = Rc::new(RefCell::new(None));
    let mut views = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let shape = expected_shape(t, &vars)
            .map_err(|reason| MoeError::config(format!("model_type `{family}`: {reason}")))?;
        let kind = dtype.unwrap_or_else(|| vars[&t.parts[0].var].kind());
        let st_dtype = dtype_of(kind).ok_or_else(|| {
            MoeError::config(format!(
                "cannot save tensor `{}` as {kind:?}: expected a floating-point kind (Float, \
                 Half, BFloat16 or Double)",
                t.name
            ))
        })?;
        let mut parts: Vec<(Tensor, Placement)> = t
            .parts
            .iter()
            .map(|p| (vars[&p.var].shallow_clone(), p.placement))
            .collect();
        parts.sort_by_key(|(_, p)| match p {
            Placement::PackedRows { offset }
            | Placement::Interleaved { offset }
            | Placement::Columns { offset } => *offset,
            _ => 0,
        });
        views.push((
            t.name.clone(),
            Assembled {
                parts,
                kind,
                dtype: st_dtype,
                shape: shape.iter().map(|&d| d as usize).collect(),
                error: Rc::clone(&error),
            },
        ));
    }
    write_safetensors(path, views, || {
        error.borrow_mut().take().map(|e| e.to_string())
    })
}
