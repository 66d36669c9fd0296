//! Who shares secrets with whom: SecAgg+'s sparse neighbour graph, or the complete graph of
//! SecAgg for small rounds.
//!
//! The sparse graph is a Harary graph `H(k, n)` (every site joined to the `k/2` sites
//! before and after it on a ring) over a random order of the sites, as Bell et al. (CCS
//! 2020, section 3) build it; the order is drawn by ChaCha20 from a SHA-256 of the whole
//! roster, so every site derives the same graph and no one chooses it alone. Each site has
//! `k` neighbours (`k` rounded up to even), and a graph of logarithmic degree keeps every
//! site's cost logarithmic in the number of sites.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

/// The neighbours of every site, by 0-based roster position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    neighbours: Vec<Vec<usize>>,
}

impl Graph {
    /// The graph of `n` sites in which each has `degree` neighbours, from `seed`; the
    /// complete graph when `degree` is 0 or reaches `n - 1`.
    pub fn new(n: usize, degree: usize, seed: [u8; 32]) -> Graph {
        let complete = degree == 0 || degree >= n.saturating_sub(1);
        let neighbours = if complete {
            (0..n)
                .map(|i| (0..n).filter(|&j| j != i).collect())
                .collect()
        } else {
            let half = degree.div_ceil(2);
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha20Rng::from_seed(seed));
            let mut position = vec![0; n];
            for (p, &site) in order.iter().enumerate() {
                position[site] = p;
            }
            (0..n)
                .map(|site| {
                    let p = position[site];
                    let mut ns: Vec<usize> = (1..=half)
                        .flat_map(|d| [order[(p + d) % n], order[(p + n - d) % n]])
                        .collect();
                    ns.sort_unstable();
                    ns.dedup();
                    ns
                })
                .collect()
        };
        Graph { neighbours }
    }

    /// The neighbours of site `i`, ascending.
    pub fn neighbours(&self, i: usize) -> &[usize] {
        &self.neighbours[i]
    }

    /// Whether `i` and `j` are neighbours.
    pub fn joined(&self, i: usize, j: usize) -> bool {
        self.neighbours[i].binary_search(&j).is_ok()
    }

    /// How many sites.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether there are no sites.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every graph is symmetric without loops; a sparse one gives every site the same
    /// (even) degree and depends on the seed; a complete one joins everyone.
    #[test]
    fn graphs_are_symmetric_regular_and_seeded() {
        for (n, degree) in [(2, 0), (5, 4), (5, 9), (10, 4), (100, 14), (101, 7)] {
            let g = Graph::new(n, degree, [3; 32]);
            let complete = degree == 0 || degree >= n - 1;
            let want = if complete {
                n - 1
            } else {
                degree.div_ceil(2) * 2
            };
            for i in 0..n {
                assert_eq!(
                    g.neighbours(i).len(),
                    want,
                    "n {n} degree {degree} site {i}"
                );
                assert!(!g.joined(i, i));
                for &j in g.neighbours(i) {
                    assert!(g.joined(j, i), "{i}-{j} not symmetric");
                }
            }
        }
        assert_ne!(Graph::new(100, 14, [3; 32]), Graph::new(100, 14, [4; 32]));
        assert_eq!(Graph::new(100, 14, [3; 32]), Graph::new(100, 14, [3; 32]));
    }
}
