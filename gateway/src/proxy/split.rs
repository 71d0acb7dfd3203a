//! Traffic splits: one route's requests shared among groups by weight — blue/green
//! (100/0, then 0/100) and canaries (95/5). The weights are swapped atomically at
//! runtime; a request sees either the old or the new weights, never a mix. Which weights
//! a split serves is the fleet's decision (docs/fleet.md): the runtime split of its
//! route when there is one, else the file's.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use http::header::{self, HeaderValue};

use super::group::Group;

/// One route's split.
#[derive(Debug)]
pub struct Split {
    /// The groups, by name (sorted), with the weights in the same order.
    groups: Vec<Arc<Group>>,
    weights: ArcSwap<Vec<u32>>,
    /// The weights the configuration file gave: served while the route has no runtime
    /// split.
    file_weights: Arc<Vec<u32>>,
    sticky_cookie: Option<String>,
}

/// A change of weights that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    /// The new weights name a group this split does not have.
    #[error("the split has no group {0:?}; its groups are: {1}")]
    UnknownGroup(String, String),
    /// Every weight is zero.
    #[error("the weights must have a positive sum")]
    ZeroSum,
}

impl Split {
    /// A split over `groups` (name → group) at `weights` (name → weight); both have the
    /// same names.
    pub(crate) fn new(
        weights: &BTreeMap<String, u32>,
        groups: &BTreeMap<String, Arc<Group>>,
        sticky_cookie: Option<String>,
    ) -> Option<Self> {
        let mut members = Vec::new();
        let mut values = Vec::new();
        for (name, weight) in weights {
            members.push(groups.get(name)?.clone());
            values.push(*weight);
        }
        Some(Self {
            groups: members,
            file_weights: Arc::new(values.clone()),
            weights: ArcSwap::from_pointee(values),
            sticky_cookie,
        })
    }

    /// The group for one request: the one the sticky cookie names if it still gets
    /// traffic, else one drawn by weight. The second value is the `Set-Cookie` to send
    /// when the client should be pinned to a group it was not pinned to.
    pub(crate) fn pick(&self, headers: &HeaderMap) -> (&Arc<Group>, Option<HeaderValue>) {
        let weights = self.weights.load();
        if let Some(cookie) = &self.sticky_cookie {
            if let Some(pinned) = cookie_value(headers, cookie)
                .and_then(|v| self.groups.iter().position(|g| g.name == v))
                .filter(|i| weights[*i] > 0)
            {
                return (&self.groups[pinned], None);
            }
        }
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let mut ticket = fastrand::u64(..total.max(1));
        let mut chosen = self.groups.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if ticket < u64::from(*w) {
                chosen = i;
                break;
            }
            ticket -= u64::from(*w);
        }
        let group = &self.groups[chosen];
        let set_cookie = self.sticky_cookie.as_ref().and_then(|cookie| {
            HeaderValue::try_from(format!("{cookie}={}; Path=/; HttpOnly", group.name)).ok()
        });
        (group, set_cookie)
    }

    /// The weights now, by group name.
    pub fn weights(&self) -> BTreeMap<String, u32> {
        self.by_name(&self.weights.load())
    }

    /// The configuration file's weights, by group name.
    pub fn file_weights(&self) -> BTreeMap<String, u32> {
        self.by_name(&self.file_weights)
    }

    fn by_name(&self, values: &[u32]) -> BTreeMap<String, u32> {
        self.groups
            .iter()
            .zip(values)
            .map(|(g, w)| (g.name.clone(), *w))
            .collect()
    }

    /// `new` as a whole split of this one's groups: the groups it does not name get 0.
    ///
    /// # Errors
    /// A name that is not one of this split's groups, or weights that sum to zero.
    pub fn complete(
        &self,
        new: &BTreeMap<String, u32>,
    ) -> Result<BTreeMap<String, u32>, SplitError> {
        self.values_of(new).map(|values| self.by_name(&values))
    }

    /// Serves `runtime` (a route's runtime split), or the file's weights when there is
    /// none.
    ///
    /// # Errors
    /// `runtime` does not fit this split's groups (a task started from another file): the
    /// file's weights are served instead.
    pub fn follow(&self, runtime: Option<&BTreeMap<String, u32>>) -> Result<(), SplitError> {
        let values = match runtime.map(|w| self.values_of(w)) {
            Some(Ok(values)) => Arc::new(values),
            Some(Err(error)) => {
                self.weights.store(self.file_weights.clone());
                return Err(error);
            }
            None => self.file_weights.clone(),
        };
        self.weights.store(values);
        Ok(())
    }

    /// The weights of `new` in this split's group order.
    fn values_of(&self, new: &BTreeMap<String, u32>) -> Result<Vec<u32>, SplitError> {
        if let Some(unknown) = new
            .keys()
            .find(|n| !self.groups.iter().any(|g| &g.name == *n))
        {
            let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(SplitError::UnknownGroup(unknown.clone(), names.join(", ")));
        }
        let values: Vec<u32> = self
            .groups
            .iter()
            .map(|g| new.get(&g.name).copied().unwrap_or(0))
            .collect();
        if values.iter().all(|w| *w == 0) {
            return Err(SplitError::ZeroSum);
        }
        Ok(values)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiergate_config::{ProxySettings, UpstreamSettings};

    fn split(weights: &[(&str, u32)], sticky: Option<&str>) -> Split {
        let groups: BTreeMap<String, Arc<Group>> = weights
            .iter()
            .map(|(name, _)| {
                let g = Group::new(
                    &UpstreamSettings::new(name, &["127.0.0.1:1"]),
                    &ProxySettings::default(),
                )
                .unwrap();
                ((*name).to_owned(), Arc::new(g))
            })
            .collect();
        let weights = weights.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect();
        Split::new(&weights, &groups, sticky.map(str::to_owned)).unwrap()
    }

    fn share_of_blue(s: &Split, headers: &HeaderMap) -> usize {
        (0..1000)
            .filter(|_| s.pick(headers).0.name == "blue")
            .count()
    }

    #[test]
    fn weights_decide_and_a_switch_is_total() {
        let s = split(&[("blue", 100), ("green", 0)], None);
        let none = HeaderMap::new();
        assert_eq!(share_of_blue(&s, &none), 1000);
        s.follow(Some(&BTreeMap::from([("green".to_owned(), 100)])))
            .unwrap();
        assert_eq!(share_of_blue(&s, &none), 0);
        assert_eq!(s.weights()["blue"], 0);
    }

    #[test]
    fn bad_weights_are_refused_and_the_file_weights_serve() {
        let s = split(&[("blue", 100), ("green", 0)], None);
        let err = s
            .complete(&BTreeMap::from([("purple".to_owned(), 1)]))
            .unwrap_err();
        assert!(matches!(err, SplitError::UnknownGroup(ref g, _) if g == "purple"));
        assert_eq!(
            s.complete(&BTreeMap::from([("blue".to_owned(), 0)])),
            Err(SplitError::ZeroSum)
        );
        s.follow(Some(&BTreeMap::from([("green".to_owned(), 1)])))
            .unwrap();
        // A runtime split this task's groups cannot serve falls back to the file's.
        assert!(
            s.follow(Some(&BTreeMap::from([("purple".to_owned(), 1)])))
                .is_err()
        );
        assert_eq!(s.weights()["blue"], 100);
    }

    #[test]
    fn a_sticky_cookie_pins_while_its_group_gets_traffic() {
        let s = split(&[("blue", 50), ("green", 50)], Some("tg"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; tg=green"));
        assert_eq!(share_of_blue(&s, &h), 0);
        assert!(s.pick(&h).1.is_none());
        s.follow(Some(&BTreeMap::from([("blue".to_owned(), 1)])))
            .unwrap();
        let (group, cookie) = s.pick(&h);
        assert_eq!(group.name, "blue");
        assert_eq!(cookie.unwrap(), "tg=blue; Path=/; HttpOnly");
    }

    #[test]
    fn a_reset_serves_the_file_weights_again() {
        let s = split(&[("blue", 100), ("green", 0)], None);
        s.follow(Some(&BTreeMap::from([("green".to_owned(), 100)])))
            .unwrap();
        assert_eq!(s.weights()["green"], 100);
        s.follow(None).unwrap();
        assert_eq!(s.weights(), s.file_weights());
        assert_eq!(s.weights()["blue"], 100);
    }
}
