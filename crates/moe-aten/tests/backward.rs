//! `moe_aten::backward`: the backward pass returns libtorch's errors
//! instead of panicking. Under expert parallelism the all-to-all's backward
//! is a collective: a peer process that exits after the forward pass, or
//! that stops answering, makes the survivor's backward a
//! `MoeError::Distributed` within the group's timeout. The peer is this
//! test binary run again as rank 1 (over a TCPStore on 127.0.0.1).

mod common;

use common::free_port;
use moe_aten::dist::{Group, GroupOptions, LaunchEnv};
use moe_core::MoeError;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[test]
fn a_backward_returns_gradients_and_local_errors_as_torch_errors() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    let x = Tensor::from_slice(&[4.0f32, 5.0, 6.0]);
    let loss = (&w * &x).sum(Kind::Float);
    moe_aten::backward(&loss).unwrap();
    assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [4.0, 5.0, 6.0]);
    // The graph is freed after a backward: a second one is libtorch's error.
    let err = moe_aten::backward(&loss).unwrap_err();
    assert!(matches!(err, MoeError::Torch(_)), "{err}");
    assert!(err.to_string().contains("second time"), "{err}");
    // A loss that needs no gradient.
    let err = moe_aten::backward(&x.sum(Kind::Float)).unwrap_err();
    assert!(matches!(err, MoeError::Torch(_)), "{err}");
    assert!(err.to_string().contains("does not require grad"), "{err}");
}

/// The environment variable that makes this binary rank 1 of a test below.
const PEER: &str = "MOE_BACKWARD_PEER";
const PORT: &str = "MOE_BACKWARD_PORT";
/// The group's timeout: every wait ends after it.
const TIMEOUT: Duration = Duration::from_secs(5);

fn launch(rank: i64, port: u16) -> LaunchEnv {
    LaunchEnv {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: 2,
        local_rank: rank,
        agent_store: false,
    }
}

fn options() -> GroupOptions {
    GroupOptions {
        timeout: TIMEOUT,
        ..GroupOptions::default()
    }
}

/// Runs `test` of this binary again as rank 1, with `PEER` set to `how`.
fn spawn_peer(test: &str, how: &str, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(PEER, how)
        .env(PORT, port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// One rank's forward all-to-all: 3 rows to each rank, a differentiable output.
fn forward(group: &Group) -> (Tensor, Tensor) {
    let input = Tensor::ones([6, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let output = group.all_to_all(&input, &[3, 3], &[3, 3]).unwrap();
    (input, output)
}

/// Rank 1: joins, takes part in the forward pass, then exits (`exit`, as a
/// process that crashed or was killed: no destructor runs, the OS closes
/// its connections) or stops answering (`hang`, until it is killed).
fn run_peer(how: &str) {
    tch::set_num_threads(1);
    let port: u16 = std::env::var(PORT).unwrap().parse().unwrap();
    let group = Group::from_launch(&launch(1, port), &options()).unwrap();
    let (_input, _output) = forward(&group);
    match how {
        "exit" => std::process::exit(0),
        _ => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}

/// Rank 0: the forward pass with the peer, then the backward alone; the
/// error and how long the backward took.
fn survive(test: &str, how: &str) -> (MoeError, Duration) {
    let port = free_port();
    let mut peer = spawn_peer(test, how, port);
    let group = Group::from_launch(&launch(0, port), &options()).unwrap();
    let (_input, output) = forward(&group);
    if how == "exit" {
        // The peer is gone before the backward starts.
        let status = peer.wait().unwrap();
        assert!(status.success(), "the peer failed before exiting: {status}");
    }
    let start = Instant::now();
    let result = moe_aten::backward(&output.sum(Kind::Float));
    let took = start.elapsed();
    let _ = peer.kill();
    let _ = peer.wait();
    (
        result.expect_err("a backward without its peer succeeded"),
        took,
    )
}

#[test]
fn a_peer_that_exits_after_the_forward_fails_the_backward_within_the_timeout() {
    const TEST: &str = "a_peer_that_exits_after_the_forward_fails_the_backward_within_the_timeout";
    if let Ok(how) = std::env::var(PEER) {
        return run_peer(&how);
    }
    let (err, took) = survive(TEST, "exit");
    assert!(matches!(err, MoeError::Distributed(_)), "{err:?}");
    let message = err.to_string();
    println!("after {took:?}: {message}");
    assert!(
        message.contains("backward pass") && message.contains("all_to_all backward"),
        "{message}"
    );
    assert!(
        took < TIMEOUT + Duration::from_secs(10),
        "{took:?}: {message}"
    );
}

#[test]
fn a_peer_that_stops_answering_fails_the_backward_at_the_timeout() {
    const TEST: &str = "a_peer_that_stops_answering_fails_the_backward_at_the_timeout";
    if let Ok(how) = std::env::var(PEER) {
        return run_peer(&how);
    }
    let (err, took) = survive(TEST, "hang");
    assert!(matches!(err, MoeError::Distributed(_)), "{err:?}");
    let message = err.to_string();
    println!("after {took:?}: {message}");
    assert!(message.contains("all_to_all backward"), "{message}");
    // It waited for the peer up to the timeout, not forever.
    assert!(
        took >= TIMEOUT - Duration::from_millis(500) && took < TIMEOUT + Duration::from_secs(10),
        "{took:?}: {message}"
    );
}
