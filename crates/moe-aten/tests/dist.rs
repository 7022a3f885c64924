//! c10d's Gloo process groups with ranks as threads of this process: the
//! smoke test of the shim (a torch upgrade that breaks it fails here),
//! uneven all-to-all with its gradient, the other collectives, and errors
//! within the timeout.

mod common;

use common::free_port;
use moe_aten::dist::{Group, GroupOptions, LaunchEnv, ReduceOp};
use moe_core::MoeError;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn options(seconds: u64) -> GroupOptions {
    GroupOptions {
        timeout: Duration::from_secs(seconds),
        ..GroupOptions::default()
    }
}

/// Runs `f(group)` on every rank, each in its own thread; the results in rank order.
fn on_ranks<T: Send>(groups: Vec<Group>, f: impl Fn(Group) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let f = &f;
                scope.spawn(move || f(g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `r` sends `sends[r][j]` rows to rank `j`; row values say who sent
/// them where (`100 r + 10 j + i`).
fn rows(rank: i64, sends: &[i64]) -> Tensor {
    let values: Vec<f32> = sends
        .iter()
        .enumerate()
        .flat_map(|(j, &n)| (0..n).map(move |i| (100 * rank + 10 * j as i64 + i) as f32))
        .collect();
    Tensor::from_slice(&values).view([-1, 1]).repeat([1, 3])
}

#[test]
fn uneven_all_to_all_and_its_gradient() {
    // sends[r][j]: rows from rank r to rank j; rank 2 receives nothing.
    let sends = [[2i64, 0, 0], [1, 3, 0], [0, 4, 0]];
    let groups = Group::in_process(3, &options(60)).unwrap();
    let results = on_ranks(groups, |g| {
        let r = g.rank() as usize;
        let input = rows(g.rank(), &sends[r]).set_requires_grad(true);
        let receive: Vec<i64> = (0..3).map(|s| sends[s][r]).collect();
        let out = g.all_to_all(&input, &receive, &sends[r]).unwrap();
        // A gradient that says which rank received each row: d(out)/d = 1000 (r + 1).
        (out.shallow_clone() * (1000.0 * (r as f64 + 1.0)))
            .sum(Kind::Float)
            .backward();
        (out.detach(), input.grad())
    });
    for (r, (out, grad)) in results.iter().enumerate() {
        let expected: Vec<f32> = (0..3)
            .flat_map(|s| (0..sends[s][r]).map(move |i| (100 * s + 10 * r) as f32 + i as f32))
            .collect();
        let got: Vec<f32> = Vec::try_from(out.select(1, 0)).unwrap();
        assert_eq!(got, expected, "rank {r} received");
        // Each row's gradient comes back from the rank it went to.
        let want: Vec<f32> = (0..3)
            .flat_map(|j| (0..sends[r][j]).map(move |_| 1000.0 * (j as f32 + 1.0)))
            .collect();
        let got: Vec<f32> = Vec::try_from(grad.select(1, 0)).unwrap();
        assert_eq!(got, want, "rank {r} gradient");
    }
}

#[test]
fn reduce_broadcast_gather_and_barrier() {
    let groups = Group::in_process(4, &options(60)).unwrap();
    let results = on_ranks(groups, |g| {
        let r = g.rank() as f64;
        let mut sum = Tensor::from_slice(&[r, 2.0 * r]);
        g.all_reduce_(&mut sum, ReduceOp::Sum).unwrap();
        let mut max = Tensor::from_slice(&[r, -r]);
        g.all_reduce_(&mut max, ReduceOp::Max).unwrap();
        let mut from_two = Tensor::from_slice(&[r; 3]);
        g.broadcast_(&mut from_two, 2).unwrap();
        let gathered = g.all_gather(&Tensor::from_slice(&[r, r * r])).unwrap();
        g.barrier().unwrap();
        (sum, max, from_two, gathered)
    });
    for (sum, max, from_two, gathered) in results {
        assert_eq!(Vec::<f64>::try_from(&sum).unwrap(), [6.0, 12.0]);
        assert_eq!(Vec::<f64>::try_from(&max).unwrap(), [3.0, 0.0]);
        assert_eq!(Vec::<f64>::try_from(&from_two).unwrap(), [2.0; 3]);
        assert_eq!(gathered.size(), [4, 2]);
        assert_eq!(
            Vec::<f64>::try_from(gathered.view([-1])).unwrap(),
            [0.0, 0.0, 1.0, 1.0, 2.0, 4.0, 3.0, 9.0]
        );
    }
}

#[test]
fn a_peer_that_leaves_is_an_error_within_the_timeout() {
    let groups = Group::in_process(2, &options(5)).unwrap();
    let start = Instant::now();
    let results = on_ranks(groups, |g| {
        if g.rank() == 1 {
            drop(g); // leaves without taking part
            return None;
        }
        let mut t = Tensor::from_slice(&[1.0f32]);
        Some(g.all_reduce_(&mut t, ReduceOp::Sum))
    });
    let err = results[0].as_ref().unwrap().as_ref().unwrap_err();
    assert!(matches!(err, MoeError::Distributed(_)), "{err}");
    assert!(err.to_string().contains("all_reduce on rank 0"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn mismatched_splits_are_errors() {
    // Locally wrong: checked before anything is sent.
    let groups = Group::in_process(2, &options(5)).unwrap();
    let results = on_ranks(groups, |g| {
        let input = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
        let wrong_sum = g.all_to_all(&input, &[1, 1], &[1, 1]).unwrap_err();
        let wrong_len = g.all_to_all(&input, &[3], &[3]).unwrap_err();
        (wrong_sum.to_string(), wrong_len.to_string())
    });
    for (wrong_sum, wrong_len) in results {
        assert!(wrong_sum.contains("sum of the input splits"), "{wrong_sum}");
        assert!(wrong_len.contains("one split per rank (2)"), "{wrong_len}");
    }
    // Ranks that disagree: rank 0 expects 2 rows from rank 1, which sends 1.
    let groups = Group::in_process(2, &options(5)).unwrap();
    let start = Instant::now();
    let results = on_ranks(groups, |g| {
        let input = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        if g.rank() == 0 {
            g.all_to_all(&input, &[1, 2], &[1, 1]).map(|_| ())
        } else {
            g.all_to_all(&input, &[1, 1], &[1, 1]).map(|_| ())
        }
    });
    for result in &results {
        let err = result.as_ref().unwrap_err().to_string();
        assert!(
            err.contains("rank 1 sends 1 rows to rank 0, which expects 2 from it"),
            "{err}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn launch_environments_are_checked() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let good = LaunchEnv::read(env(&[
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]))
    .unwrap();
    assert_eq!((good.rank, good.world_size, good.local_rank), (1, 2, 1));
    assert!(good.agent_store);
    let cases: [(&'static [(&'static str, &'static str)], &str); 4] = [
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2")],
            "MASTER_PORT is not set",
        ),
        (
            &[
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
                ("RANK", "2"),
                ("WORLD_SIZE", "2"),
            ],
            "expected 0 <= RANK < WORLD_SIZE",
        ),
        (
            &[
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "99999"),
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
            ],
            "not a TCP port",
        ),
        (
            &[("RANK", "x"), ("WORLD_SIZE", "2")],
            "RANK = \"x\" is not an integer",
        ),
    ];
    for (vars, needle) in cases {
        let err = LaunchEnv::read(env(vars)).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    // A single rank forms a group over TCP on its own.
    let solo = LaunchEnv {
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        rank: 0,
        world_size: 1,
        local_rank: 0,
        agent_store: false,
    };
    let g = Group::from_launch(&solo, &options(20)).unwrap();
    let out = g
        .all_to_all(&Tensor::from_slice(&[1.0f32, 2.0]), &[2], &[2])
        .unwrap();
    assert_eq!(Vec::<f32>::try_from(&out).unwrap(), [1.0, 2.0]);
    // A second rank that never comes: the store's wait ends with the timeout.
    let lonely = LaunchEnv {
        world_size: 2,
        master_port: free_port(),
        ..solo
    };
    let start = Instant::now();
    let err = Group::from_launch(&lonely, &options(3)).unwrap_err();
    assert!(matches!(err, MoeError::Distributed(_)), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

/// One rank's NCCL group on the first GPU exchanges with itself (feature
/// `nccl`, `MOE_CUDA_TESTS=1` on a machine with a GPU, `-- --ignored`).
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs MOE_CUDA_TESTS=1 and a GPU"]
fn a_single_rank_nccl_group_exchanges_on_the_gpu() {
    if std::env::var("MOE_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set MOE_CUDA_TESTS=1 on a machine with a GPU");
        return;
    }
    let solo = LaunchEnv {
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        rank: 0,
        world_size: 1,
        local_rank: 0,
        agent_store: false,
    };
    let nccl = GroupOptions {
        backend: moe_aten::dist::Backend::Nccl,
        ..options(60)
    };
    let g = Group::from_launch(&solo, &nccl).unwrap();
    let device = tch::Device::Cuda(0);
    let input = Tensor::from_slice(&[1.0f32, 2.0, 3.0])
        .to_device(device)
        .set_requires_grad(true);
    let out = g.all_to_all(&input, &[3], &[3]).unwrap();
    (out.shallow_clone() * 2.0).sum(Kind::Float).backward();
    assert_eq!(
        Vec::<f32>::try_from(out.to_device(tch::Device::Cpu)).unwrap(),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(
        Vec::<f32>::try_from(input.grad().to_device(tch::Device::Cpu)).unwrap(),
        [2.0; 3]
    );
    let mut t = Tensor::from_slice(&[4.0f32]).to_device(device);
    g.all_reduce_(&mut t, ReduceOp::Sum).unwrap();
    g.barrier().unwrap();
}
