//! Where environment variables come from.

use std::collections::HashMap;
use std::hash::BuildHasher;

/// A set of environment variables: [`ProcessEnv`] in production, a `HashMap` in tests (never
/// `std::env::set_var`, which races with every other thread reading the environment).
pub trait Source {
    /// The value of `name`, or `None` when it is unset (or not valid UTF-8).
    fn get(&self, name: &str) -> Option<String>;

    /// Every variable name that is set, in no particular order.
    fn names(&self) -> Vec<String>;
}

/// The environment of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn names(&self) -> Vec<String> {
        // Non-UTF-8 names can't be ours, and `std::env::vars` would panic on them.
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect()
    }
}

impl<S: BuildHasher> Source for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}
