//! Benchmarks of Tiergate's hot paths (`benches/`). The load-test harness and the peer
//! comparisons will live here too (`src/bin/`).
