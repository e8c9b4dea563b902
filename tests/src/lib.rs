//! End-to-end tests across clusters built from Linux network namespaces.
//!
//! Empty until the lab issue lands: the gateway's own end-to-end tests over real
//! sockets live in `eastwest-gateway/tests/`.
