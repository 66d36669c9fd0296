//! Secure aggregation: the coordinator learns the sum of the sites' integer-encoded
//! updates and nothing else about any one of them.
//!
//! The protocol is SecAgg+ (Bell, Bhargav, Gascón, Laur, Raykova, "Secure Single-Server
//! Aggregation with (Poly)Logarithmic Overhead", CCS 2020), whose complete-graph case is
//! SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
//! Learning", CCS 2017), in the malicious-server variant of the latter (signed keys and a
//! signed consistency check of the surviving set). One round, its phases numbered as in
//! Bonawitz et al.:
//!
//! 0. **Advertise keys.** Each site makes fresh X25519 keys for this round only (one pair
//!    to encrypt shares, one whose secret is a uniform scalar `σ` that masks pairwise), a
//!    uniform scalar `β` for its self-mask, and signs both public keys and a commitment to
//!    `β` with its certificate key ([`Signer`]): a coordinator cannot substitute a key.
//! 1. **Share keys.** Given the roster of signed advertisements, each site checks that its
//!    own advertisement is there unchanged, derives the sparse neighbour graph ([`graph`])
//!    from the roster itself, checks its neighbours' signatures (the only keys it uses; the
//!    coordinator checked every one as it arrived), and sends each neighbour Shamir
//!    shares of `σ` and `β` (over the prime field of Curve25519's scalars, `vsss-rs`),
//!    encrypted and authenticated for that neighbour alone (ChaCha20-Poly1305 under a key
//!    agreed by X25519 and expanded by HKDF, bound to the round and both sites).
//! 2. **Masked input.** Each site adds to its input, modulo `2^b`, its self-mask
//!    `PRG(β)` and, for every neighbour whose shares reached it, `±PRG(s_uv)` with `s_uv`
//!    the X25519 secret it shares with that neighbour (ChaCha20 as the PRG). Each masked
//!    input alone is uniform.
//! 3. **Consistency check.** The coordinator names the sites whose masked input arrived;
//!    each site checks it is among them and signs the list.
//! 4. **Unmasking.** Shown enough signatures over the same list, each site reveals, for
//!    each neighbour, the share of `β` if that neighbour is listed or the share of `σ` if
//!    it is not — never both, so no site's input is ever unmasked on its own. The
//!    coordinator rebuilds the secrets it needs ([`Aggregator::finish`]) and removes the
//!    masks: what is left is the exact sum modulo `2^b`.
//!
//! A site may drop at any phase: its pairwise masks are removed with its `σ` (dropped
//! after sharing), or its input is counted and its self-mask removed with its `β`
//! (dropped after its masked input). Below the threshold of shares anywhere, the round
//! fails ([`Fault::BelowThreshold`]) and nothing is unmasked. Every key, mask and share is
//! made fresh for one [`Context`] (run, round and a fresh nonce) and lives only in memory,
//! so a round that is abandoned (a coordinator killed mid-round) is re-run with new ones.
//!
//! This module is the protocol alone, on plain values: the integer encoding of updates, the
//! distributed noise and the transport are layers above it.

mod certs;
mod crypto;
pub mod graph;
mod server;
mod site;
#[cfg(test)]
mod tests;

pub use certs::{CertVerifier, SITE_IDENTITY_PREFIX};
pub use crypto::{EcdsaSigner, EcdsaVerifier, Signer, Verifier};
pub use server::Aggregator;
pub use site::SiteSession;

use serde::{Deserialize, Serialize};

/// The round a secure aggregation belongs to. Every derived key and every signature is
/// bound to all of it, so nothing from one round (or one attempt at a round) is accepted
/// in another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The run.
    pub run_id: String,
    /// The round.
    pub round: u64,
    /// Fresh randomness the coordinator draws for each attempt at the round.
    pub nonce: [u8; 32],
}

impl Context {
    /// The context's canonical bytes (length-prefixed fields).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.run_id.len());
        put(&mut out, self.run_id.as_bytes());
        out.extend_from_slice(&self.round.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }
}

/// Appends `field` with its length, so that concatenated fields cannot be confused.
pub(crate) fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

/// The settings of one secure aggregation, the same at the coordinator and every site.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Inputs and sums are integers modulo `2^modulus_bits` (1 to 64).
    pub modulus_bits: u32,
    /// Length of every input vector.
    pub dimension: usize,
    /// Neighbours each site shares its secrets with; 0, or at least the number of other
    /// sites, means every other site (SecAgg's complete graph).
    pub degree: usize,
    /// The fraction of a site's neighbours whose shares rebuild its secrets, in (1/2, 1]:
    /// above one half, so the shares held by honest sites cannot be split to rebuild both
    /// of a site's secrets.
    pub threshold: f64,
    /// Fewest sites a round proceeds with at any phase (at least 3).
    pub min_sites: usize,
}

impl Params {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.modulus_bits) {
            return Err(format!(
                "modulus_bits: {} must be between 1 and 64",
                self.modulus_bits
            ));
        }
        if self.dimension == 0 {
            return Err("dimension: 0; an input has at least one value".into());
        }
        if !(self.threshold > 0.5 && self.threshold <= 1.0) {
            return Err(format!(
                "threshold: {} must be above 0.5 and at most 1",
                self.threshold
            ));
        }
        if self.min_sites < 3 {
            return Err(format!(
                "min_sites: {} must be at least 3 (of two sites' sum, the coordinator and \
                 either site learn the other's input; and a site's secrets are shared \
                 with at least two neighbours, never handed to one whole)",
                self.min_sites
            ));
        }
        Ok(())
    }

    /// The largest value plus one: inputs and sums are below it.
    pub(crate) fn modulus_mask(&self) -> u64 {
        if self.modulus_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }

    /// Shares needed to rebuild the secrets of a site with `neighbours` neighbours: the
    /// threshold's fraction of them, rounded up, and never fewer than two (one share
    /// would be the secret itself).
    pub fn shares_needed(&self, neighbours: usize) -> usize {
        ((self.threshold * neighbours as f64).ceil() as usize).clamp(2, neighbours.max(2))
    }
}

/// Phase 0: a site's public keys for one round, signed with its certificate key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// The site.
    pub site: String,
    /// X25519 public key that shares sent to this site are encrypted under.
    pub encryption_key: [u8; 32],
    /// X25519 public key of the pairwise masks.
    pub mask_key: [u8; 32],
    /// SHA-256 commitment to the self-mask secret, checked when it is rebuilt.
    pub self_mask_commitment: [u8; 32],
    /// The site's signature over all of the above and the [`Context`].
    pub signature: Vec<u8>,
}

impl Advertisement {
    /// What the signature covers.
    pub(crate) fn signed_bytes(&self, ctx: &Context) -> Vec<u8> {
        let mut m = b"fedflow-secagg/v1 advertisement".to_vec();
        put(&mut m, &ctx.encode());
        put(&mut m, self.site.as_bytes());
        m.extend_from_slice(&self.encryption_key);
        m.extend_from_slice(&self.mask_key);
        m.extend_from_slice(&self.self_mask_commitment);
        m
    }
}

/// Phase 1: the advertisements of the round's sites, as the coordinator relays them to
/// every site (sorted by site; a site's position is its index in the protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// One advertisement per site, sorted by site.
    pub advertisements: Vec<Advertisement>,
}

/// Phase 1: one site's shares for one neighbour, readable by that neighbour alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending site.
    pub from: String,
    /// The receiving site.
    pub to: String,
    /// ChaCha20-Poly1305 ciphertext and tag of the two shares.
    pub ciphertext: Vec<u8>,
}

/// Phase 2: a site's masked input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The site.
    pub site: String,
    /// The input plus its masks, modulo `2^modulus_bits`.
    pub values: Vec<u64>,
}

/// Phase 3: a site's signature over the list of sites whose masked input arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSignature {
    /// The signing site.
    pub site: String,
    /// Its signature over the [`Context`] and the sorted list.
    pub signature: Vec<u8>,
}

/// What the survivor signatures cover: the context and the SHA-256 of the sorted list (so
/// each of the many signatures over a long list hashes 32 bytes, not the list).
pub(crate) fn survivors_signed_bytes(ctx: &Context, survivors: &[String]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut list = Sha256::new();
    for s in survivors {
        let mut field = Vec::with_capacity(8 + s.len());
        put(&mut field, s.as_bytes());
        list.update(&field);
    }
    let mut m = b"fedflow-secagg/v1 survivors".to_vec();
    put(&mut m, &ctx.encode());
    m.extend_from_slice(&list.finalize());
    m
}

/// Which of a site's secrets a revealed share is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Secret {
    /// The self-mask secret `β` of a site whose masked input arrived.
    SelfMask,
    /// The pairwise-mask secret `σ` of a site that dropped before its masked input.
    PairwiseMask,
}

/// Phase 4: one share a site reveals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The site whose secret it is a share of.
    pub owner: String,
    /// Which secret.
    pub secret: Secret,
    /// The share's value (a canonical Curve25519 scalar); its point is the revealing
    /// site's index.
    pub value: [u8; 32],
}

/// Phase 4: everything one site reveals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmasking {
    /// The revealing site.
    pub site: String,
    /// Its shares, one per neighbour it holds shares of.
    pub shares: Vec<RevealedShare>,
}

/// Why a secure aggregation step was refused. A site refusing a step reveals nothing
/// further for the round; a coordinator failing to finish unmasks nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The settings are unusable.
    #[error("secure aggregation settings: {0}")]
    Params(String),
    /// A message belongs to another round or attempt, or arrived at the wrong phase.
    #[error("{0}")]
    Protocol(String),
    /// A signature does not verify for the site it names.
    #[error("the signature of site {0} does not verify")]
    BadSignature(String),
    /// The roster does not carry this site's own advertisement unchanged.
    #[error("the roster changes or omits this site's own keys")]
    KeySubstituted,
    /// A public key is unusable (a low-order X25519 point).
    #[error("site {0} advertised an unusable key")]
    BadKey(String),
    /// An envelope does not decrypt or is not meant for this site.
    #[error("the shares from site {0} do not open: {1}")]
    BadEnvelope(String, String),
    /// The coordinator lists this site as dropped although it sent its masked input.
    #[error("the coordinator lists this site as dropped")]
    DeclaredDropped,
    /// Too few sites, shares or signatures for the step to be safe.
    #[error("{what}: {have} of the {need} needed")]
    BelowThreshold {
        /// What is short.
        what: String,
        /// How many there are.
        have: usize,
        /// How many are needed.
        need: usize,
    },
    /// A rebuilt secret does not match what its site committed to.
    #[error("the shares of site {0} rebuild a secret other than the one it committed to")]
    BadShares(String),
    /// An input is the wrong length or out of range.
    #[error("input: {0}")]
    Input(String),
}
