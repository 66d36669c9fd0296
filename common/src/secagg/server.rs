//! The coordinator's side of one secure aggregation: it relays what the sites send and,
//! at the end, removes the masks from the sum. It never holds an individual input: masked
//! inputs are added into one running sum as they arrive, and only secrets the survivors
//! chose to reveal (one of each site's two) are rebuilt.

use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::scalar::Scalar;
use rayon::prelude::*;

use super::crypto::{self, Verifier};
use super::site::{self, Checked, check_roster};
use super::{
    Advertisement, Context, Envelope, Fault, MaskedInput, Params, Roster, Secret,
    SurvivorSignature, Unmasking, survivors_signed_bytes,
};

/// One secure aggregation at the coordinator, fed the sites' messages phase by phase.
pub struct Aggregator {
    ctx: Context,
    params: Params,
    verifier: Box<dyn Verifier>,
    ads: BTreeMap<String, Advertisement>,
    roster: Option<Checked>,
    /// Envelopes by recipient position, from the sites that sent theirs (phase 1).
    mailboxes: BTreeMap<usize, Vec<Envelope>>,
    /// Positions of the sites whose envelopes arrived (phase 1).
    shared: BTreeSet<usize>,
    /// Whether phase 1 is over: once a site has its mailbox, no more shares are taken,
    /// so every site masks with exactly the senders the coordinator unmasks for.
    sharing_closed: bool,
    /// Positions of the sites whose masked input arrived (phase 2), and the running sum.
    masked: BTreeSet<usize>,
    sum: Vec<u64>,
    /// The survivor list once fixed (phase 3), and the signatures over it.
    survivors: Option<Vec<String>>,
    /// What the survivors sign, made once when the list is fixed (every confirmation is
    /// checked against it).
    survivors_signed: Vec<u8>,
    signatures: BTreeMap<String, SurvivorSignature>,
    /// Revealed shares by owner position: (holder position, value) (phase 4).
    revealed: BTreeMap<usize, Vec<(usize, Scalar, Secret)>>,
    revealers: BTreeSet<usize>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("ctx", &self.ctx)
            .field("sites", &self.ads.len())
            .finish_non_exhaustive()
    }
}

impl Aggregator {
    /// A new aggregation for `ctx`; `verifier` checks the sites' signatures.
    pub fn new(
        ctx: Context,
        params: Params,
        verifier: Box<dyn Verifier>,
    ) -> Result<Aggregator, Fault> {
        params.validate().map_err(Fault::Params)?;
        Ok(Aggregator {
            sum: vec![0; params.dimension],
            ctx,
            params,
            verifier,
            ads: BTreeMap::new(),
            roster: None,
            mailboxes: BTreeMap::new(),
            shared: BTreeSet::new(),
            sharing_closed: false,
            masked: BTreeSet::new(),
            survivors: None,
            survivors_signed: Vec::new(),
            signatures: BTreeMap::new(),
            revealed: BTreeMap::new(),
            revealers: BTreeSet::new(),
        })
    }

    /// Phase 0: a site's advertisement (its signature and keys checked; one per site).
    pub fn advertise(&mut self, ad: Advertisement) -> Result<(), Fault> {
        if self.roster.is_some() {
            return Err(Fault::Protocol("the roster is already fixed".into()));
        }
        if !self
            .verifier
            .verify(&ad.site, &ad.signed_bytes(&self.ctx), &ad.signature)
        {
            return Err(Fault::BadSignature(ad.site));
        }
        site::check_keys(&ad)?;
        if self.ads.contains_key(&ad.site) {
            return Err(Fault::Protocol(format!(
                "site {} advertised twice",
                ad.site
            )));
        }
        self.ads.insert(ad.site.clone(), ad);
        Ok(())
    }

    /// Ends phase 0: the roster every advertised site is sent.
    pub fn roster(&mut self) -> Result<Roster, Fault> {
        let roster = Roster {
            advertisements: self.ads.values().cloned().collect(),
        };
        if self.roster.is_none() {
            // Every advertisement's signature and keys were checked as it arrived.
            self.roster = Some(check_roster(&self.ctx, &self.params, &roster)?);
        }
        Ok(roster)
    }

    fn checked(&self) -> Result<&Checked, Fault> {
        self.roster
            .as_ref()
            .ok_or_else(|| Fault::Protocol("the roster is not fixed yet".into()))
    }

    fn position(&self, site: &str) -> Result<usize, Fault> {
        self.checked()?
            .sites
            .binary_search_by(|s| s.as_str().cmp(site))
            .map_err(|_| Fault::Protocol(format!("{site} is not in the roster")))
    }

    /// Phase 1: a site's envelopes, one for each of its neighbours.
    pub fn share(&mut self, site: &str, envelopes: Vec<Envelope>) -> Result<(), Fault> {
        let i = self.position(site)?;
        if self.sharing_closed {
            return Err(Fault::Protocol("sharing is over".into()));
        }
        if self.shared.contains(&i) {
            return Err(Fault::Protocol(format!("{site} sent its shares twice")));
        }
        let checked = self.checked()?;
        let want: BTreeSet<usize> = checked.graph.neighbours(i).iter().copied().collect();
        let mut got = BTreeMap::new();
        for e in envelopes {
            let j = self.position(&e.to)?;
            if e.from != site || !want.contains(&j) || got.insert(j, e).is_some() {
                return Err(Fault::Protocol(format!(
                    "{site}'s envelopes are not one for each of its neighbours"
                )));
            }
        }
        if got.len() != want.len() {
            return Err(Fault::Protocol(format!(
                "{site}'s envelopes are not one for each of its neighbours"
            )));
        }
        for (j, e) in got {
            self.mailboxes.entry(j).or_default().push(e);
        }
        self.shared.insert(i);
        Ok(())
    }

    /// Ends phase 1 (at the first call): the envelopes addressed to `site`, which must be
    /// one of the sites that shared.
    pub fn mailbox(&mut self, site: &str) -> Result<Vec<Envelope>, Fault> {
        let i = self.position(site)?;
        if !self.sharing_closed && self.shared.len() < self.params.min_sites {
            return Err(Fault::BelowThreshold {
                what: "sites that shared their keys".into(),
                have: self.shared.len(),
                need: self.params.min_sites,
            });
        }
        self.sharing_closed = true;
        if !self.shared.contains(&i) {
            return Err(Fault::Protocol(format!("{site} did not share its keys")));
        }
        Ok(self.mailboxes.get(&i).cloned().unwrap_or_default())
    }

    /// Phase 2: a site's masked input, added into the sum at once.
    pub fn masked_input(&mut self, input: MaskedInput) -> Result<(), Fault> {
        let i = self.position(&input.site)?;
        if self.survivors.is_some() {
            return Err(Fault::Protocol("the survivors are already fixed".into()));
        }
        if !self.shared.contains(&i) {
            return Err(Fault::Protocol(format!(
                "{} did not share its keys",
                input.site
            )));
        }
        if self.masked.contains(&i) {
            return Err(Fault::Protocol(format!(
                "{} sent its masked input twice",
                input.site
            )));
        }
        let mask = self.params.modulus_mask();
        if input.values.len() != self.params.dimension
            || input.values.iter().any(|v| v & !mask != 0)
        {
            return Err(Fault::Input(format!(
                "{}'s masked input is not {} values below 2^{}",
                input.site, self.params.dimension, self.params.modulus_bits
            )));
        }
        for (s, v) in self.sum.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v) & mask;
        }
        self.masked.insert(i);
        Ok(())
    }

    /// Ends phase 2: the sorted list of sites whose masked input arrived, for every one
    /// of them to sign.
    pub fn survivors(&mut self) -> Result<Vec<String>, Fault> {
        if let Some(s) = &self.survivors {
            return Ok(s.clone());
        }
        if self.masked.len() < self.params.min_sites {
            return Err(Fault::BelowThreshold {
                what: "masked inputs".into(),
                have: self.masked.len(),
                need: self.params.min_sites,
            });
        }
        let checked = self.checked()?;
        let list: Vec<String> = self
            .masked
            .iter()
            .map(|&i| checked.sites[i].clone())
            .collect();
        self.survivors_signed = survivors_signed_bytes(&self.ctx, &list);
        self.survivors = Some(list.clone());
        Ok(list)
    }

    /// Phase 3: a survivor's signature over the list.
    pub fn confirm(&mut self, sig: SurvivorSignature) -> Result<(), Fault> {
        let survivors = self
            .survivors
            .as_ref()
            .ok_or_else(|| Fault::Protocol("the survivors are not fixed yet".into()))?;
        if survivors.binary_search(&sig.site).is_err() {
            return Err(Fault::Protocol(format!("{} is not a survivor", sig.site)));
        }
        if !self
            .verifier
            .verify(&sig.site, &self.survivors_signed, &sig.signature)
        {
            return Err(Fault::BadSignature(sig.site));
        }
        self.signatures.insert(sig.site.clone(), sig);
        Ok(())
    }

    /// Ends phase 3: the signatures every survivor is shown before it reveals anything.
    pub fn signatures(&self) -> Vec<SurvivorSignature> {
        self.signatures.values().cloned().collect()
    }

    /// Phase 4: the shares a survivor reveals.
    pub fn unmasking(&mut self, u: Unmasking) -> Result<(), Fault> {
        let i = self.position(&u.site)?;
        let survivors = self
            .survivors
            .as_ref()
            .ok_or_else(|| Fault::Protocol("the survivors are not fixed yet".into()))?;
        if !self.signatures.contains_key(&u.site) || self.revealers.contains(&i) {
            return Err(Fault::Protocol(format!(
                "{} did not confirm the survivors, or revealed twice",
                u.site
            )));
        }
        // Every share is checked before any is kept, so a refused message leaves nothing.
        let graph = &self.checked()?.graph;
        let mut kept = Vec::with_capacity(u.shares.len());
        for share in &u.shares {
            let owner = self.position(&share.owner)?;
            let survived = survivors.binary_search(&share.owner).is_ok();
            let want = if survived {
                Secret::SelfMask
            } else {
                Secret::PairwiseMask
            };
            let value = crypto::scalar(&share.value)
                .ok_or_else(|| Fault::Protocol(format!("{}'s share is not a scalar", u.site)))?;
            if share.secret != want || !graph.joined(i, owner) {
                return Err(Fault::Protocol(format!(
                    "{} revealed a share it should not hold or reveal",
                    u.site
                )));
            }
            kept.push((owner, (i, value, share.secret)));
        }
        self.revealers.insert(i);
        for (owner, share) in kept {
            self.revealed.entry(owner).or_default().push(share);
        }
        Ok(())
    }

    /// Rebuilds the secret of the site at `owner` from the revealed shares.
    fn rebuild(&self, owner: usize) -> Result<Scalar, Fault> {
        let checked = self.checked()?;
        let neighbours = checked.graph.neighbours(owner).len();
        let need = self.params.shares_needed(neighbours);
        let shares: Vec<(u64, Scalar)> = self
            .revealed
            .get(&owner)
            .map(|v| {
                v.iter()
                    .map(|&(holder, value, _)| (holder as u64 + 1, value))
                    .collect()
            })
            .unwrap_or_default();
        if shares.len() < need {
            return Err(Fault::BelowThreshold {
                what: format!("shares of {}'s secret", checked.sites[owner]),
                have: shares.len(),
                need,
            });
        }
        crypto::combine(&shares)
    }

    /// Ends the aggregation: removes every mask and returns the sum of the survivors'
    /// inputs modulo `2^modulus_bits`. Fails, unmasking nothing, when some site's secret
    /// cannot be rebuilt from the shares revealed or does not match its commitment.
    pub fn finish(&self) -> Result<Vec<u64>, Fault> {
        let checked = self.checked()?;
        let mask = self.params.modulus_mask();
        if self.survivors.is_none() {
            return Err(Fault::Protocol("the survivors are not fixed yet".into()));
        }
        // The masks to remove, as (seed, whether to subtract): each survivor's self-mask,
        // and for each site that dropped after sharing, its pairwise mask with every
        // surviving neighbour (who got its envelope and masked with it). Secrets are
        // rebuilt and checked in parallel, and the mask streams summed in parallel.
        let self_masks = self.masked.par_iter().map(|&v| {
            let beta = self.rebuild(v)?;
            let site = &checked.sites[v];
            if crypto::commit(&self.ctx, site, &beta) != checked.ads[v].self_mask_commitment {
                return Err(Fault::BadShares(site.clone()));
            }
            Ok(vec![(site::self_mask_seed(&self.ctx, site, &beta), true)])
        });
        let dropped: Vec<usize> = self.shared.difference(&self.masked).copied().collect();
        let pairwise = dropped.par_iter().map(|&v| {
            let sigma = self.rebuild(v)?;
            let secret = crypto::x25519_secret(&sigma);
            if x25519_dalek::PublicKey::from(&secret).to_bytes() != checked.ads[v].mask_key {
                return Err(Fault::BadShares(checked.sites[v].clone()));
            }
            checked
                .graph
                .neighbours(v)
                .iter()
                .filter(|w| self.masked.contains(w))
                .map(|&w| {
                    let shared = crypto::agree(&secret, &checked.ads[w].mask_key)
                        .ok_or_else(|| Fault::BadKey(checked.sites[w].clone()))?;
                    // Undo what w added: it subtracted if w > v, so add back then.
                    Ok((
                        site::pairwise_seed(&self.ctx, &shared, w, v),
                        !site::subtracts(w, v),
                    ))
                })
                .collect::<Result<Vec<_>, Fault>>()
        });
        let ops: Vec<([u8; 32], bool)> = self_masks
            .chain(pairwise)
            .collect::<Result<Vec<_>, Fault>>()?
            .into_iter()
            .flatten()
            .collect();
        let dim = self.params.dimension;
        let add = |mut a: Vec<u64>, b: Vec<u64>| {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.wrapping_add(y) & mask;
            }
            a
        };
        let removed = ops
            .par_iter()
            .fold(
                || vec![0u64; dim],
                |mut acc, &(seed, subtract)| {
                    crypto::add_mask(&mut acc, seed, subtract, mask);
                    acc
                },
            )
            .reduce(|| vec![0u64; dim], add);
        Ok(add(self.sum.clone(), removed))
    }
}
