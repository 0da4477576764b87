//! The benchmark loop shared by `basalt-img bench` and `basalt-bench`.
