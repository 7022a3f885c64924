//! Where a forward pass spends its time: named spans timed on the calling
//! thread while [`profiled`] runs, nothing (one thread-local flag read)
//! otherwise.
//!
//! On the CPU every libtorch op runs to completion before it returns, so a
//! span's wall time is its ops' time plus the host work between them; on a
//! GPU it times only the launches unless the caller synchronises. Spans
//! nest: an outer span's time includes its inner ones' (the report lists
//! each name once, with its total and count).

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

thread_local! {
    static SPANS: RefCell<Option<Vec<Span>>> = const { RefCell::new(None) };
}

/// One name's total.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// What was timed (`"attention"`, `"experts"`, ...).
    pub name: &'static str,
    /// Summed wall time.
    pub total: Duration,
    /// How many times it ran.
    pub calls: u64,
}

/// The spans recorded by one [`profiled`] call, in order of first use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// Per name.
    pub spans: Vec<Span>,
    /// The whole [`profiled`] call.
    pub wall: Duration,
}

impl Profile {
    /// The total of `name` (zero when it never ran).
    pub fn total(&self, name: &str) -> Duration {
        self.spans
            .iter()
            .find(|s| s.name == name)
            .map_or(Duration::ZERO, |s| s.total)
    }
}

impl fmt::Display for Profile {
    /// A table: name, total ms, share of the wall time, calls.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wall = self.wall.as_secs_f64();
        writeln!(
            f,
            "{:<16} {:>10} {:>7} {:>8}",
            "span", "ms", "share", "calls"
        )?;
        for s in &self.spans {
            let ms = s.total.as_secs_f64() * 1e3;
            let share = if wall > 0.0 {
                100.0 * s.total.as_secs_f64() / wall
            } else {
                0.0
            };
            writeln!(f, "{:<16} {ms:>10.2} {share:>6.1}% {:>8}", s.name, s.calls)?;
        }
        write!(f, "{:<16} {:>10.2} {:>6.1}%", "wall", wall * 1e3, 100.0)
    }
}

/// Runs `f` with span recording on for this thread and returns its result
/// with the [`Profile`]. Nested calls report to the outermost.
pub fn profiled<T>(f: impl FnOnce() -> T) -> (T, Profile) {
    let outer = SPANS.with(|s| s.borrow().is_some());
    if outer {
        return (f(), Profile::default());
    }
    SPANS.with(|s| *s.borrow_mut() = Some(Vec::new()));
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            SPANS.with(|s| s.borrow_mut().take());
        }
    }
    let off = Off;
    let start = Instant::now();
    let out = f();
    let wall = start.elapsed();
    let spans = SPANS.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(off);
    (out, Profile { spans, wall })
}

/// Runs `f`, adding its wall time to the span `name` when inside
/// [`profiled`].
pub fn span<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if SPANS.with(|s| s.borrow().is_none()) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    SPANS.with(|s| {
        if let Some(spans) = s.borrow_mut().as_mut() {
            match spans.iter_mut().find(|x| x.name == name) {
                Some(x) => {
                    x.total += elapsed;
                    x.calls += 1;
                }
                None => spans.push(Span {
                    name,
                    total: elapsed,
                    calls: 1,
                }),
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_inside_and_are_off_outside() {
        let sleep = || std::thread::sleep(Duration::from_millis(2));
        span("outside", sleep);
        let ((), profile) = profiled(|| {
            for _ in 0..3 {
                span("a", || span("b", sleep));
            }
            span("c", sleep);
        });
        let names: Vec<&str> = profile.spans.iter().map(|s| s.name).collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(profile.spans[0].calls, 3);
        assert!(profile.total("a") >= profile.total("b"));
        assert!(profile.total("b") >= Duration::from_millis(6));
        assert!(profile.wall >= profile.total("a") + profile.total("c"));
        assert_eq!(profile.total("outside"), Duration::ZERO);
        // Recording is off again.
        assert!(SPANS.with(|s| s.borrow().is_none()));
    }
}
