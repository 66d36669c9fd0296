//! A site's side of one secure aggregation: a session made for one [`Context`], taken
//! through the phases in order. Each phase consumes the session, so no step can be
//! repeated with other inputs (a coordinator asking twice, with two survivor lists, gets
//! nothing the second time).

use std::collections::BTreeMap;

use curve25519_dalek::scalar::Scalar;

use super::crypto::{self, Signer, Verifier};
use super::graph::Graph;
use super::{
    Advertisement, Context, Envelope, Fault, MaskedInput, Params, RevealedShare, Roster, Secret,
    SurvivorSignature, Unmasking, survivors_signed_bytes,
};

/// What the roster tells a site once it is checked.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The sites, sorted (position = 0-based index).
    pub(crate) sites: Vec<String>,
    /// The advertisements, in the same order.
    pub(crate) ads: Vec<Advertisement>,
    /// The neighbour graph.
    pub(crate) graph: Graph,
}

/// Checks a roster's shape (sorted, no site twice, at least `min_sites`) and derives the
/// graph from it; the signatures are checked by [`verify_ads`], of the sites that matter to
/// the caller.
pub(crate) fn check_roster(
    ctx: &Context,
    params: &Params,
    roster: &Roster,
) -> Result<Checked, Fault> {
    let ads = &roster.advertisements;
    if ads.len() < params.min_sites {
        return Err(Fault::BelowThreshold {
            what: "sites in the roster".into(),
            have: ads.len(),
            need: params.min_sites,
        });
    }
    if !ads.windows(2).all(|w| w[0].site < w[1].site) {
        return Err(Fault::Protocol(
            "the roster is not sorted by site, or names a site twice".into(),
        ));
    }
    let mut seed = b"fedflow-secagg/v1 graph".to_vec();
    for ad in ads {
        super::put(&mut seed, &ad.signed_bytes(ctx));
        super::put(&mut seed, &ad.signature);
    }
    let seed = crypto::derive(&seed, "graph", ctx, &[]);
    Ok(Checked {
        sites: ads.iter().map(|a| a.site.clone()).collect(),
        ads: ads.clone(),
        graph: Graph::new(ads.len(), params.degree, seed),
    })
}

/// Checks the signature and the keys of the advertisements at `positions`. A site checks
/// its neighbours' (the only keys it uses): what the other advertisements could change is
/// the graph's seed, which a coordinator can vary anyway by choosing whom to include, so
/// checking them all would cost every site time linear in the federation and buy nothing.
pub(crate) fn verify_ads(
    ctx: &Context,
    checked: &Checked,
    positions: impl IntoIterator<Item = usize>,
    verifier: &dyn Verifier,
) -> Result<(), Fault> {
    for i in positions {
        let ad = &checked.ads[i];
        if !verifier.verify(&ad.site, &ad.signed_bytes(ctx), &ad.signature) {
            return Err(Fault::BadSignature(ad.site.clone()));
        }
        check_keys(ad)?;
    }
    Ok(())
}

/// Refuses an advertisement with a low-order X25519 key (its shared secrets would be
/// predictable).
pub(crate) fn check_keys(ad: &Advertisement) -> Result<(), Fault> {
    for key in [&ad.encryption_key, &ad.mask_key] {
        if crypto::agree(&crypto::x25519_secret(&Scalar::ONE), key).is_none() {
            return Err(Fault::BadKey(ad.site.clone()));
        }
    }
    Ok(())
}

/// The additional data an envelope from `from` to `to` is bound to.
pub(crate) fn envelope_aad(ctx: &Context, from: &str, to: &str) -> Vec<u8> {
    let mut aad = b"fedflow-secagg/v1 envelope".to_vec();
    super::put(&mut aad, &ctx.encode());
    super::put(&mut aad, from.as_bytes());
    super::put(&mut aad, to.as_bytes());
    aad
}

/// The seed of the pairwise mask between the sites at positions `i` and `j` from their
/// X25519 secret.
pub(crate) fn pairwise_seed(ctx: &Context, shared: &[u8; 32], i: usize, j: usize) -> [u8; 32] {
    let (lo, hi) = (i.min(j) as u64, i.max(j) as u64);
    let mut pair = lo.to_be_bytes().to_vec();
    pair.extend_from_slice(&hi.to_be_bytes());
    crypto::derive(shared, "pairwise mask", ctx, &pair)
}

/// The seed of a site's self-mask.
pub(crate) fn self_mask_seed(ctx: &Context, site: &str, beta: &Scalar) -> [u8; 32] {
    crypto::derive(beta.as_bytes(), "self mask", ctx, site.as_bytes())
}

/// Whether the site at position `i` subtracts (rather than adds) its mask with `j`.
pub(crate) fn subtracts(i: usize, j: usize) -> bool {
    i > j
}

/// Phase 0 done: the site's secrets for the round, waiting for the roster.
pub struct SiteSession {
    ctx: Context,
    params: Params,
    site: String,
    signer: Box<dyn Signer>,
    encryption: x25519_dalek::StaticSecret,
    sigma: Scalar,
    beta: Scalar,
    advertisement: Advertisement,
}

impl std::fmt::Debug for SiteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSession")
            .field("ctx", &self.ctx)
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl SiteSession {
    /// Phase 0: fresh keys and secrets for `ctx`, and their signed advertisement.
    pub fn new(
        ctx: Context,
        params: Params,
        site: impl Into<String>,
        signer: Box<dyn Signer>,
    ) -> Result<(SiteSession, Advertisement), Fault> {
        params.validate().map_err(Fault::Params)?;
        let site = site.into();
        let encryption = crypto::x25519_secret(&crypto::random_scalar());
        let sigma = crypto::random_scalar();
        let beta = crypto::random_scalar();
        let mut ad = Advertisement {
            site: site.clone(),
            encryption_key: x25519_dalek::PublicKey::from(&encryption).to_bytes(),
            mask_key: x25519_dalek::PublicKey::from(&crypto::x25519_secret(&sigma)).to_bytes(),
            self_mask_commitment: crypto::commit(&ctx, &site, &beta),
            signature: Vec::new(),
        };
        ad.signature = signer.sign(&ad.signed_bytes(&ctx));
        let session = SiteSession {
            ctx,
            params,
            site,
            signer,
            encryption,
            sigma,
            beta,
            advertisement: ad.clone(),
        };
        Ok((session, ad))
    }

    /// Phase 1: checks the roster and makes one envelope of shares per neighbour.
    pub fn share(
        self,
        roster: &Roster,
        verifier: &dyn Verifier,
    ) -> Result<(SharedSession, Vec<Envelope>), Fault> {
        let checked = check_roster(&self.ctx, &self.params, roster)?;
        let me = checked
            .sites
            .iter()
            .position(|s| *s == self.site)
            .ok_or(Fault::KeySubstituted)?;
        if checked.ads[me] != self.advertisement {
            return Err(Fault::KeySubstituted);
        }
        let neighbours = checked.graph.neighbours(me).to_vec();
        verify_ads(&self.ctx, &checked, neighbours.iter().copied(), verifier)?;
        let points: Vec<u64> = neighbours.iter().map(|&j| j as u64 + 1).collect();
        let need = self.params.shares_needed(neighbours.len());
        let sigma_shares = crypto::split(&self.sigma, need, &points)?;
        let beta_shares = crypto::split(&self.beta, need, &points)?;
        let mut envelopes = Vec::with_capacity(neighbours.len());
        for (k, &j) in neighbours.iter().enumerate() {
            let to = &checked.sites[j];
            let shared = crypto::agree(&self.encryption, &checked.ads[j].encryption_key)
                .ok_or_else(|| Fault::BadKey(to.clone()))?;
            let key = crypto::derive(
                &shared,
                "share encryption",
                &self.ctx,
                &envelope_aad(&self.ctx, &self.site, to),
            );
            let mut plain = Vec::with_capacity(64);
            plain.extend_from_slice(&sigma_shares[k].value.0.to_bytes());
            plain.extend_from_slice(&beta_shares[k].value.0.to_bytes());
            envelopes.push(Envelope {
                from: self.site.clone(),
                to: to.clone(),
                ciphertext: crypto::seal(&key, &envelope_aad(&self.ctx, &self.site, to), &plain),
            });
        }
        Ok((
            SharedSession {
                inner: self,
                checked,
                me,
            },
            envelopes,
        ))
    }
}

/// Phase 1 done: the roster is checked and the shares sent.
pub struct SharedSession {
    inner: SiteSession,
    checked: Checked,
    me: usize,
}

impl std::fmt::Debug for SharedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSession")
            .field("site", &self.inner.site)
            .finish_non_exhaustive()
    }
}

/// The shares a site holds of one neighbour's secrets.
#[derive(Debug, Clone, Copy)]
struct Held {
    sigma: Scalar,
    beta: Scalar,
}

impl SharedSession {
    /// Phase 2: opens the envelopes addressed to this site (their senders are the
    /// neighbours it masks with) and masks `input` (each value below `2^modulus_bits`).
    pub fn mask(
        self,
        incoming: &[Envelope],
        input: &[u64],
    ) -> Result<(MaskedSession, MaskedInput), Fault> {
        let p = &self.inner.params;
        if input.len() != p.dimension {
            return Err(Fault::Input(format!(
                "{} values where the round has {}",
                input.len(),
                p.dimension
            )));
        }
        let mask = p.modulus_mask();
        if let Some((i, v)) = input.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(Fault::Input(format!(
                "value {i} is {v}, not below 2^{}",
                p.modulus_bits
            )));
        }
        let ctx = &self.inner.ctx;
        let me = self.me;
        let mut held = BTreeMap::new();
        for e in incoming {
            let from = &e.from;
            let j =
                self.checked.sites.binary_search(from).map_err(|_| {
                    Fault::BadEnvelope(from.clone(), "not a site of the roster".into())
                })?;
            if e.to != self.inner.site || !self.checked.graph.joined(me, j) {
                return Err(Fault::BadEnvelope(
                    from.clone(),
                    "not meant for this site".into(),
                ));
            }
            let shared = crypto::agree(&self.inner.encryption, &self.checked.ads[j].encryption_key)
                .ok_or_else(|| Fault::BadKey(from.clone()))?;
            let aad = envelope_aad(ctx, from, &self.inner.site);
            let key = crypto::derive(&shared, "share encryption", ctx, &aad);
            let plain = crypto::open(&key, &aad, &e.ciphertext).ok_or_else(|| {
                Fault::BadEnvelope(from.clone(), "it does not decrypt for this round".into())
            })?;
            let scalars = <[u8; 64]>::try_from(plain.as_slice())
                .ok()
                .and_then(|b| {
                    Some(Held {
                        sigma: crypto::scalar(b[..32].try_into().ok()?)?,
                        beta: crypto::scalar(b[32..].try_into().ok()?)?,
                    })
                })
                .ok_or_else(|| Fault::BadEnvelope(from.clone(), "not two scalars".into()))?;
            if held.insert(j, scalars).is_some() {
                return Err(Fault::BadEnvelope(from.clone(), "sent twice".into()));
            }
        }
        let mut values = input.to_vec();
        crypto::add_mask(
            &mut values,
            self_mask_seed(ctx, &self.inner.site, &self.inner.beta),
            false,
            mask,
        );
        let sigma = crypto::x25519_secret(&self.inner.sigma);
        for &j in held.keys() {
            let shared = crypto::agree(&sigma, &self.checked.ads[j].mask_key)
                .ok_or_else(|| Fault::BadKey(self.checked.sites[j].clone()))?;
            crypto::add_mask(
                &mut values,
                pairwise_seed(ctx, &shared, me, j),
                subtracts(me, j),
                mask,
            );
        }
        let masked = MaskedInput {
            site: self.inner.site.clone(),
            values,
        };
        Ok((MaskedSession { shared: self, held }, masked))
    }
}

/// Phase 2 done: the masked input is sent; the site holds its neighbours' shares.
pub struct MaskedSession {
    shared: SharedSession,
    held: BTreeMap<usize, Held>,
}

impl std::fmt::Debug for MaskedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedSession")
            .field("site", &self.shared.inner.site)
            .finish_non_exhaustive()
    }
}

impl MaskedSession {
    /// Phase 3: checks the coordinator's list of sites whose masked input arrived (this
    /// site among them, all of the roster, enough of them) and signs it.
    pub fn confirm(
        self,
        survivors: &[String],
    ) -> Result<(ConfirmedSession, SurvivorSignature), Fault> {
        let s = &self.shared;
        let p = &s.inner.params;
        if !survivors.windows(2).all(|w| w[0] < w[1]) {
            return Err(Fault::Protocol(
                "the survivors are not sorted, or one is named twice".into(),
            ));
        }
        if let Some(stranger) = survivors
            .iter()
            .find(|x| s.checked.sites.binary_search(x).is_err())
        {
            return Err(Fault::Protocol(format!(
                "survivor {stranger} is not in the roster"
            )));
        }
        if survivors.binary_search(&s.inner.site).is_err() {
            return Err(Fault::DeclaredDropped);
        }
        if survivors.len() < p.min_sites {
            return Err(Fault::BelowThreshold {
                what: "surviving sites".into(),
                have: survivors.len(),
                need: p.min_sites,
            });
        }
        let signature = SurvivorSignature {
            site: s.inner.site.clone(),
            signature: s
                .inner
                .signer
                .sign(&survivors_signed_bytes(&s.inner.ctx, survivors)),
        };
        Ok((
            ConfirmedSession {
                masked: self,
                survivors: survivors.to_vec(),
            },
            signature,
        ))
    }
}

/// Phase 3 done: the site signed one list of survivors.
pub struct ConfirmedSession {
    masked: MaskedSession,
    survivors: Vec<String>,
}

impl std::fmt::Debug for ConfirmedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmedSession")
            .field("site", &self.masked.shared.inner.site)
            .finish_non_exhaustive()
    }
}

impl ConfirmedSession {
    /// Phase 4: given the survivors' signatures, checks that enough distinct survivors
    /// signed the very list this site signed, then reveals for each neighbour it holds
    /// shares of the share of `β` (a survivor) or of `σ` (a site that dropped), never both.
    pub fn unmask(
        self,
        signatures: &[SurvivorSignature],
        verifier: &dyn Verifier,
    ) -> Result<Unmasking, Fault> {
        let m = &self.masked;
        let s = &m.shared;
        let signed = survivors_signed_bytes(&s.inner.ctx, &self.survivors);
        let need = s
            .inner
            .params
            .min_sites
            .max(s.inner.params.shares_needed(self.survivors.len()));
        // Enough valid signatures from distinct survivors over this very list: checked one by
        // one until there are `need` (a bad one refuses the step at once).
        let mut signers = std::collections::BTreeSet::new();
        for sig in signatures {
            if signers.len() >= need {
                break;
            }
            if self.survivors.binary_search(&sig.site).is_err() {
                return Err(Fault::Protocol(format!(
                    "{} signed but is not a survivor",
                    sig.site
                )));
            }
            if signers.contains(sig.site.as_str()) {
                continue;
            }
            if !verifier.verify(&sig.site, &signed, &sig.signature) {
                return Err(Fault::BadSignature(sig.site.clone()));
            }
            signers.insert(sig.site.as_str());
        }
        if signers.len() < need {
            return Err(Fault::BelowThreshold {
                what: "survivors confirming the same list".into(),
                have: signers.len(),
                need,
            });
        }
        let shares = m
            .held
            .iter()
            .map(|(&j, h)| {
                let owner = s.checked.sites[j].clone();
                let survived = self.survivors.binary_search(&owner).is_ok();
                let (secret, value) = if survived {
                    (Secret::SelfMask, h.beta)
                } else {
                    (Secret::PairwiseMask, h.sigma)
                };
                RevealedShare {
                    owner,
                    secret,
                    value: value.to_bytes(),
                }
            })
            .collect();
        Ok(Unmasking {
            site: s.inner.site.clone(),
            shares,
        })
    }
}
