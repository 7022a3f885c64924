//! Helpers shared by this crate's test files.

/// A TCP port on 127.0.0.1 that was free a moment ago, for a test's store.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
