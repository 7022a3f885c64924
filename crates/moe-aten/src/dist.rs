//! Process groups of libtorch's c10d, the engine under `torch.distributed`:
//! a [`Group`] of ranks that exchange tensors through Gloo (CPU tensors),
//! formed from torchrun's environment over a `TCPStore`
//! ([`Group::from_env`]) or as threads of one process over a `HashStore`
//! ([`Group::in_process`], for tests).
//!
//! The collectives are c10d's: [`Group::all_to_all`] (uneven splits,
//! autograd-aware: the backward is the reverse exchange, as PyTorch's
//! `all_to_all_single` with autograd), [`Group::all_reduce_`],
//! [`Group::broadcast_`], [`Group::all_gather`], [`Group::barrier`]. Every
//! one waits at most the group's timeout; a peer that died, an exchange
//! whose sizes the peers disagree on, or a rank that never joins is a
//! [`MoeError::Distributed`], not a hang or a panic.

#![cfg_attr(not(moe_c10d), allow(unused_imports, dead_code))]

use crate::call_shim;
use moe_core::{MoeError, Result};
use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

#[cfg(moe_c10d)]
extern "C" {
    fn moe_c10d_tcp_store(
        host: *const c_char,
        port: c_int,
        world_size: c_int,
        is_server: bool,
        timeout_ms: i64,
        prefix: *const c_char,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_hash_store(out: *mut *mut c_void, error: *mut c_char, error_len: usize) -> c_int;
    fn moe_c10d_store_free(store: *mut c_void);
    fn moe_c10d_gloo_group(
        store: *mut c_void,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        hostname: *const c_char,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_group_free(group: *mut c_void);
    #[cfg(feature = "nccl")]
    fn moe_c10d_nccl_group(
        store: *mut c_void,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_all_to_all(
        group: *mut c_void,
        input: *const C_tensor,
        out_splits: *const i64,
        in_splits: *const i64,
        n: usize,
        out: *mut *mut C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_all_reduce(
        group: *mut c_void,
        tensor: *const C_tensor,
        op: c_int,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_broadcast(
        group: *mut c_void,
        tensor: *const C_tensor,
        root: c_int,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_all_gather(
        group: *mut c_void,
        input: *const C_tensor,
        out: *mut *mut C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn moe_c10d_barrier(group: *mut c_void, error: *mut c_char, error_len: usize) -> c_int;
}

/// How a reduction combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

/// The c10d backend of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// Gloo: CPU tensors, any machine.
    #[default]
    Gloo,
    /// NCCL: CUDA tensors (feature `nccl`, a CUDA build of libtorch).
    Nccl,
}

/// Settings of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOptions {
    /// Gloo (CPU tensors) or NCCL (CUDA tensors).
    pub backend: Backend,
    /// The longest any rendezvous or collective may wait (default 5 min,
    /// c10d's default is 30).
    pub timeout: Duration,
    /// The interface Gloo listens on, by a name that resolves to it
    /// (`127.0.0.1` for in-process groups; from the environment, the
    /// `MASTER_ADDR` host when it is local, else this machine's hostname).
    pub hostname: Option<String>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            backend: Backend::Gloo,
            timeout: Duration::from_secs(300),
            hostname: None,
        }
    }
}

/// torchrun's description of this process: `MASTER_ADDR`, `MASTER_PORT`,
/// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and whether torchrun's agent hosts
/// the store (`TORCHELASTIC_USE_AGENT_STORE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Host of the store.
    pub master_addr: String,
    /// Port of the store.
    pub master_port: u16,
    /// This process's rank, `0..world_size`.
    pub rank: i64,
    /// Number of processes.
    pub world_size: i64,
    /// Rank on this machine (the GPU it takes).
    pub local_rank: i64,
    /// torchrun's agent already serves the store; every rank is a client.
    pub agent_store: bool,
}

impl LaunchEnv {
    /// Reads the variables through `var` (`std::env::var` in
    /// [`LaunchEnv::from_env`]); a missing or malformed one, or a rank
    /// outside `0..WORLD_SIZE`, is a [`MoeError::Distributed`] naming it.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            var(name).ok_or_else(|| {
                MoeError::Distributed(format!(
                    "{name} is not set: launch with torchrun (it sets MASTER_ADDR, MASTER_PORT, \
                     RANK, WORLD_SIZE, LOCAL_RANK)"
                ))
            })
        };
        let int = |name: &str| -> Result<i64> {
            let text = get(name)?;
            text.trim()
                .parse()
                .map_err(|_| MoeError::Distributed(format!("{name} = {text:?} is not an integer")))
        };
        let world_size = int("WORLD_SIZE")?;
        let rank = int("RANK")?;
        if world_size < 1 || !(0..world_size).contains(&rank) {
            return Err(MoeError::Distributed(format!(
                "RANK = {rank} and WORLD_SIZE = {world_size}: expected 0 <= RANK < WORLD_SIZE"
            )));
        }
        let port = int("MASTER_PORT")?;
        let master_port = u16::try_from(port).map_err(|_| {
            MoeError::Distributed(format!("MASTER_PORT = {port} is not a TCP port"))
        })?;
        Ok(LaunchEnv {
            master_addr: get("MASTER_ADDR")?,
            master_port,
            rank,
            world_size,
            local_rank: var("LOCAL_RANK")
                .and_then(|v| v.parse().ok())
                .unwrap_or(rank),
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
        })
    }

    /// [`LaunchEnv::read`] of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::read(|name| std::env::var(name).ok())
    }

    /// Whether torchrun (or another launcher) set `WORLD_SIZE` for this process.
    pub fn is_launched() -> bool {
        std::env::var_os("WORLD_SIZE").is_some()
    }
}

/// A group of ranks on c10d's Gloo backend. Collectives block until every
/// rank of the group has entered them (or the timeout); each rank runs the
/// same sequence of collectives. A `Group` can move to another thread
/// (in-process ranks are threads) but is used by one thread at a time.
#[derive(Debug)]
pub struct Group {
    handle: *mut c_void,
    rank: i64,
    size: i64,
    timeout: Duration,
    backend: Backend,
    device: Device,
}

// SAFETY: the handle owns a c10d ProcessGroup, which c10d lets any thread
// use; `&mut`-free methods only enqueue work on it and wait.
unsafe impl Send for Group {}

/// A c10d store, freed on drop (the group keeps its own reference).
#[cfg(moe_c10d)]
struct Store(*mut c_void);

#[cfg(moe_c10d)]
impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { moe_c10d_store_free(self.0) }
    }
}

// SAFETY: c10d's stores are thread-safe.
#[cfg(moe_c10d)]
unsafe impl Send for Store {}
#[cfg(moe_c10d)]
unsafe impl Sync for Store {}

/// The error of a failed shim call, as [`MoeError::Distributed`] with `what` first.
#[cfg(moe_c10d)]
fn shim(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    call_shim(f).map_err(|e| {
        let message = match e {
            MoeError::Torch(t) => t.to_string(),
            other => other.to_string(),
        };
        MoeError::Distributed(format!("{what}: {}", crate::first_lines(&message)))
    })
}

fn timeout_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

#[cfg(not(moe_c10d))]
fn unavailable<T>() -> Result<T> {
    Err(MoeError::Distributed(
        "moe-aten was built without Gloo's headers, so without process groups: build through \
         `cargo xtask` (it fetches them), or set MOE_GLOO_INCLUDE to a folder holding gloo/"
            .into(),
    ))
}

impl Group {
    /// This process's rank of the group, `0..size`.
    pub fn rank(&self) -> i64 {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> i64 {
        self.size
    }

    /// The group's timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Joins the group torchrun describes ([`LaunchEnv`]): rank 0 serves
    /// the `TCPStore` at `MASTER_ADDR:MASTER_PORT` (unless torchrun's agent
    /// does), every rank connects to it and Gloo connects every pair. Errors
    /// when the environment is missing or wrong, or not every rank joins
    /// within the timeout.
    pub fn from_env(options: &GroupOptions) -> Result<Group> {
        let env = LaunchEnv::from_env()?;
        Self::from_launch(&env, options)
    }

    /// [`Group::from_env`] from an explicit [`LaunchEnv`].
    pub fn from_launch(env: &LaunchEnv, options: &GroupOptions) -> Result<Group> {
        #[cfg(not(moe_c10d))]
        {
            let _ = (env, options);
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            let host = CString::new(env.master_addr.as_str())
                .map_err(|_| MoeError::Distributed("MASTER_ADDR holds a NUL byte".into()))?;
            let prefix = CString::new("moe_layers/").expect("no NUL");
            let mut store = std::ptr::null_mut();
            let is_server = env.rank == 0 && !env.agent_store;
            shim(
                &format!(
                    "rank {} cannot reach the store at {}:{}",
                    env.rank, env.master_addr, env.master_port
                ),
                |error, len| unsafe {
                    moe_c10d_tcp_store(
                        host.as_ptr(),
                        c_int::from(env.master_port),
                        env.world_size as c_int,
                        is_server,
                        timeout_ms(options.timeout),
                        prefix.as_ptr(),
                        &mut store,
                        error,
                        len,
                    )
                },
            )?;
            let store = Store(store);
            if options.backend == Backend::Nccl {
                let device = Device::Cuda(env.local_rank.max(0) as usize);
                return Self::join_nccl(&store, env.rank, env.world_size, options.timeout, device);
            }
            let hostname = options.hostname.clone().unwrap_or_else(|| {
                if is_loopback(&env.master_addr) {
                    "127.0.0.1".into()
                } else {
                    local_hostname()
                }
            });
            Self::join(&store, env.rank, env.world_size, &hostname, options.timeout)
        }
    }

    /// `size` ranks as groups of this process over one `HashStore`,
    /// connected over `127.0.0.1`; move each to its own thread (its
    /// collectives block until every rank has entered them). For tests;
    /// Gloo only.
    pub fn in_process(size: i64, options: &GroupOptions) -> Result<Vec<Group>> {
        if options.backend != Backend::Gloo {
            return Err(MoeError::Distributed(
                "in-process ranks use Gloo: NCCL takes one process per GPU (torchrun)".into(),
            ));
        }
        if size < 1 {
            return Err(MoeError::config(format!(
                "a group needs at least one rank, got {size}"
            )));
        }
        #[cfg(not(moe_c10d))]
        {
            let _ = options;
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            let mut store = std::ptr::null_mut();
            shim("cannot create a HashStore", |error, len| unsafe {
                moe_c10d_hash_store(&mut store, error, len)
            })?;
            let store = Store(store);
            let hostname = options
                .hostname
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into());
            // Every rank joins at once: Gloo connects each pair.
            std::thread::scope(|scope| {
                let joins: Vec<_> = (0..size)
                    .map(|rank| {
                        let (store, hostname) = (&store, &hostname);
                        scope
                            .spawn(move || Self::join(store, rank, size, hostname, options.timeout))
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| {
                        j.join().unwrap_or_else(|_| {
                            Err(MoeError::Distributed("a rank's thread panicked".into()))
                        })
                    })
                    .collect()
            })
        }
    }

    /// Builds this rank's Gloo group over `store`.
    #[cfg(moe_c10d)]
    fn join(
        store: &Store,
        rank: i64,
        size: i64,
        hostname: &str,
        timeout: Duration,
    ) -> Result<Group> {
        let host = CString::new(hostname)
            .map_err(|_| MoeError::Distributed("the hostname holds a NUL byte".into()))?;
        Self::created(
            &format!("rank {rank} of {size} could not join the group"),
            (rank, size, timeout, Backend::Gloo, Device::Cpu),
            |handle, error, len| unsafe {
                moe_c10d_gloo_group(
                    store.0,
                    rank as c_int,
                    size as c_int,
                    timeout_ms(timeout),
                    host.as_ptr(),
                    handle,
                    error,
                    len,
                )
            },
        )
    }

    /// A group from the shim's `create` call, which stores the handle; its
    /// failure is an error starting with `what`.
    #[cfg(moe_c10d)]
    fn created(
        what: &str,
        (rank, size, timeout, backend, device): (i64, i64, Duration, Backend, Device),
        create: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> c_int,
    ) -> Result<Group> {
        let mut handle = std::ptr::null_mut();
        shim(what, |error, len| create(&mut handle, error, len))?;
        Ok(Group {
            handle,
            rank,
            size,
            timeout,
            backend,
            device,
        })
    }

    /// Builds this rank's NCCL group over `store` (feature `nccl`).
    #[cfg(moe_c10d)]
    fn join_nccl(
        store: &Store,
        rank: i64,
        size: i64,
        timeout: Duration,
        device: Device,
    ) -> Result<Group> {
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (store, rank, size, timeout, device);
            Err(MoeError::Distributed(
                "NCCL process groups need moe-aten's `nccl` feature (and a CUDA build of \
                 libtorch)"
                    .into(),
            ))
        }
        #[cfg(feature = "nccl")]
        {
            Self::created(
                &format!("rank {rank} of {size} could not create an NCCL group"),
                (rank, size, timeout, Backend::Nccl, device),
                |handle, error, len| unsafe {
                    moe_c10d_nccl_group(
                        store.0,
                        rank as c_int,
                        size as c_int,
                        timeout_ms(timeout),
                        handle,
                        error,
                        len,
                    )
                },
            )
        }
    }

    /// The group's backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where this rank's tensors for the group live: the CPU for Gloo, the
    /// rank's GPU (`LOCAL_RANK`) for NCCL.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Checks that `t` lives where the backend exchanges: a CPU tensor for
    /// Gloo, a CUDA tensor for NCCL.
    fn check_device(&self, t: &Tensor, what: &str) -> Result<()> {
        let ok = match self.backend {
            Backend::Gloo => t.device() == Device::Cpu,
            Backend::Nccl => t.device().is_cuda(),
        };
        if !ok {
            return Err(MoeError::Device {
                what: format!(
                    "{what} of a {:?} group (Gloo: CPU, NCCL: CUDA)",
                    self.backend
                ),
                expected: match self.backend {
                    Backend::Gloo => Device::Cpu,
                    Backend::Nccl => Device::Cuda(0),
                },
                got: t.device(),
            });
        }
        Ok(())
    }

    /// Uneven all-to-all along dimension 0: the first `input_splits[0]`
    /// rows of `input` go to rank 0, the next `input_splits[1]` to rank 1,
    /// ...; the result stacks the `output_splits[r]` rows received from
    /// each rank `r`, in rank order. Differentiable: the gradient of the
    /// result goes back through the reverse exchange.
    ///
    /// Rank `i`'s `input_splits[j]` must equal rank `j`'s
    /// `output_splits[i]`; Gloo does not check it (a disagreement truncates
    /// or leaves rows unwritten), so this first gathers every rank's splits
    /// (one small all-gather) and every rank returns the same error when any
    /// pair disagrees. [`Group::all_to_all_unchecked`] skips that when the
    /// splits come from an exchange of counts.
    pub fn all_to_all(
        &self,
        input: &Tensor,
        output_splits: &[i64],
        input_splits: &[i64],
    ) -> Result<Tensor> {
        self.check_splits(input, output_splits, input_splits)?;
        let mine: Vec<i64> = input_splits.iter().chain(output_splits).copied().collect();
        let all = self.all_gather(&Tensor::from_slice(&mine).to_device(self.device()))?;
        let all: Vec<Vec<i64>> =
            Vec::try_from(&all.to_device(Device::Cpu)).map_err(MoeError::from)?;
        let n = self.size as usize;
        for (i, splits) in all.iter().enumerate() {
            for (j, other) in all.iter().enumerate() {
                let (sends, expects) = (splits[j], other[n + i]);
                if sends != expects {
                    return Err(MoeError::Distributed(format!(
                        "all_to_all splits disagree: rank {i} sends {sends} rows to rank {j}, \
                         which expects {expects} from it"
                    )));
                }
            }
        }
        self.all_to_all_unchecked(input, output_splits, input_splits)
    }

    /// [`Group::all_to_all`] without the agreement check: the caller
    /// guarantees that rank `i`'s `input_splits[j]` is rank `j`'s
    /// `output_splits[i]` (e.g. both come from an exchange of counts).
    /// Local mistakes (lengths, negative splits, rows) are still errors.
    pub fn all_to_all_unchecked(
        &self,
        input: &Tensor,
        output_splits: &[i64],
        input_splits: &[i64],
    ) -> Result<Tensor> {
        self.check_splits(input, output_splits, input_splits)?;
        let n = self.size as usize;
        #[cfg(not(moe_c10d))]
        {
            let _ = n;
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            let mut out = std::ptr::null_mut();
            shim(
                &format!("all_to_all on rank {}", self.rank),
                |error, len| unsafe {
                    moe_c10d_all_to_all(
                        self.handle,
                        input.as_ptr(),
                        output_splits.as_ptr(),
                        input_splits.as_ptr(),
                        n,
                        &mut out,
                        error,
                        len,
                    )
                },
            )?;
            // SAFETY: the shim returned a new `at::Tensor*`, owned from here.
            Ok(unsafe { Tensor::from_ptr(out) })
        }
    }

    /// The local checks of an all-to-all: a CPU input, one split per rank,
    /// none negative, as many rows as the input splits add up to.
    fn check_splits(
        &self,
        input: &Tensor,
        output_splits: &[i64],
        input_splits: &[i64],
    ) -> Result<()> {
        self.check_device(input, "all_to_all input")?;
        let n = self.size as usize;
        if output_splits.len() != n || input_splits.len() != n {
            return Err(MoeError::Distributed(format!(
                "all_to_all needs one split per rank ({n}), got {} output and {} input splits",
                output_splits.len(),
                input_splits.len()
            )));
        }
        if output_splits.iter().chain(input_splits).any(|&s| s < 0) {
            return Err(MoeError::Distributed(format!(
                "all_to_all splits must be >= 0, got {output_splits:?} and {input_splits:?}"
            )));
        }
        let rows = input.size().first().copied().unwrap_or(0);
        if input.dim() == 0 || input_splits.iter().sum::<i64>() != rows {
            return Err(MoeError::Shape {
                what: "all_to_all input".into(),
                expected: format!(
                    "{} rows (the sum of the input splits {input_splits:?})",
                    input_splits.iter().sum::<i64>()
                ),
                got: input.size(),
            });
        }
        Ok(())
    }

    /// Reduces `tensor` over the ranks in place: afterwards every rank
    /// holds the element-wise `op` of all ranks' tensors.
    pub fn all_reduce_(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check_device(tensor, "all_reduce tensor")?;
        #[cfg(not(moe_c10d))]
        {
            let _ = op;
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            let op = match op {
                ReduceOp::Sum => 0,
                ReduceOp::Max => 1,
                ReduceOp::Min => 2,
            };
            shim(
                &format!("all_reduce on rank {}", self.rank),
                |error, len| unsafe {
                    moe_c10d_all_reduce(self.handle, tensor.as_ptr(), op, error, len)
                },
            )
        }
    }

    /// Copies rank `root`'s `tensor` into every rank's `tensor` (same
    /// shape and dtype on every rank).
    pub fn broadcast_(&self, tensor: &mut Tensor, root: i64) -> Result<()> {
        self.check_device(tensor, "broadcast tensor")?;
        if !(0..self.size).contains(&root) {
            return Err(MoeError::Distributed(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.size
            )));
        }
        #[cfg(not(moe_c10d))]
        {
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            shim(
                &format!("broadcast on rank {}", self.rank),
                |error, len| unsafe {
                    moe_c10d_broadcast(self.handle, tensor.as_ptr(), root as c_int, error, len)
                },
            )
        }
    }

    /// Every rank's `input` (same shape on every rank), stacked along a new
    /// first dimension in rank order: `[size, ...]`.
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        self.check_device(input, "all_gather input")?;
        #[cfg(not(moe_c10d))]
        {
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            let mut out = std::ptr::null_mut();
            shim(
                &format!("all_gather on rank {}", self.rank),
                |error, len| unsafe {
                    moe_c10d_all_gather(self.handle, input.as_ptr(), &mut out, error, len)
                },
            )?;
            // SAFETY: the shim returned a new `at::Tensor*`, owned from here.
            Ok(unsafe { Tensor::from_ptr(out) })
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(not(moe_c10d))]
        {
            unavailable()
        }
        #[cfg(moe_c10d)]
        {
            shim(
                &format!("barrier on rank {}", self.rank),
                |error, len| unsafe { moe_c10d_barrier(self.handle, error, len) },
            )
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(moe_c10d)]
        // SAFETY: created by the shim, freed once.
        unsafe {
            moe_c10d_group_free(self.handle)
        }
    }
}

/// Whether `host` names this machine's loopback.
#[cfg(moe_c10d)]
fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

/// This machine's hostname (`/etc/hostname`, else `localhost`).
#[cfg(moe_c10d)]
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
