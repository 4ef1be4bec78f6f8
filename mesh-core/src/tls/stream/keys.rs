//! The AEAD key of one direction of a TLS 1.3 connection once the handshake is over:
//! the per-record nonce is the IV XOR the record's sequence number (RFC 8446, 5.3),
//! the additional data is the record's 5-byte header.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// Bytes of the authentication tag of every suite the mesh offers.
pub(super) const TAG_LEN: usize = 16;

/// The key, IV and next sequence number of one direction.
pub(super) struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectionKey")
            .field("algorithm", self.key.algorithm())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// An AEAD failure: on open, a forged or corrupted record.
#[derive(Debug)]
pub(super) struct AeadFailed;

impl DirectionKey {
    /// The key rustls handed over, starting at sequence number `seq`.
    pub(super) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, rustls::Error> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(rustls::Error::General("unsupported AEAD".into())),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| rustls::Error::General("AEAD key rejected".into()))?;
        let iv = <[u8; NONCE_LEN]>::try_from(iv.as_ref())
            .map_err(|_| rustls::Error::General("AEAD IV of the wrong length".into()))?;
        if key.algorithm().tag_len() != TAG_LEN {
            return Err(rustls::Error::General(
                "AEAD tag of the wrong length".into(),
            ));
        }
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records sealed or opened with this key so far.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    fn next_nonce(&mut self) -> Result<Nonce, AeadFailed> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        // A sequence number never wraps (RFC 8446, 5.3); keys are updated long before.
        self.seq = self.seq.checked_add(1).ok_or(AeadFailed)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Seals `in_out` in place, then `inner_type` and the tag into `type_and_tag`.
    pub(super) fn seal_in_place(
        &mut self,
        header: &[u8; 5],
        in_out: &mut [u8],
        inner_type: u8,
        type_and_tag: &mut [u8],
    ) -> Result<(), AeadFailed> {
        let nonce = self.next_nonce()?;
        self.key
            .seal_in_place_scatter(
                nonce,
                Aad::from(header),
                in_out,
                &[inner_type],
                type_and_tag,
            )
            .map_err(|_| AeadFailed)
    }

    /// Seals `plaintext` into `out` (of the same length), then `inner_type` and the
    /// tag into `type_and_tag`.
    pub(super) fn seal_into(
        &mut self,
        header: &[u8; 5],
        plaintext: &[u8],
        out: &mut [u8],
        inner_type: u8,
        type_and_tag: &mut [u8],
    ) -> Result<(), AeadFailed> {
        let nonce = self.next_nonce()?;
        self.key
            .seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                plaintext,
                out,
                &[inner_type],
                type_and_tag,
            )
            .map_err(|_| AeadFailed)
    }

    /// Opens `ciphertext` (tag excluded) into `out`, of the same length.
    pub(super) fn open_into(
        &mut self,
        header: &[u8; 5],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), AeadFailed> {
        let nonce = self.next_nonce()?;
        self.key
            .open_separate_gather(nonce, Aad::from(header), ciphertext, tag, out)
            .map_err(|_| AeadFailed)
    }

    /// Opens `in_out` (tag excluded) in place.
    pub(super) fn open_in_place(
        &mut self,
        header: &[u8; 5],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), AeadFailed> {
        let nonce = self.next_nonce()?;
        self.key
            .open_in_place_separate_tag(nonce, Aad::from(header), tag, in_out)
            .map(|_| ())
            .map_err(|_| AeadFailed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn key(seq: u64) -> DirectionKey {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::new([9u8; 12]),
        };
        DirectionKey::new(seq, secrets).unwrap()
    }

    #[test]
    fn a_record_sealed_out_of_place_opens_in_place_and_into_a_buffer() {
        let header = [23, 3, 3, 0, 21];
        let (mut tx, mut rx1, mut rx2) = (key(5), key(5), key(5));
        let mut sealed = [0u8; 4 + 17];
        let (body, tail) = sealed.split_at_mut(4);
        tx.seal_into(&header, b"ping", body, 23, tail).unwrap();
        let (ct, tag) = sealed.split_at(5);
        let mut out = [0u8; 5];
        rx1.open_into(&header, ct, tag, &mut out).unwrap();
        assert_eq!(&out, b"ping\x17");
        let mut in_place = sealed;
        let (ct, tag) = in_place.split_at_mut(5);
        rx2.open_in_place(&header, ct, tag).unwrap();
        assert_eq!(ct, b"ping\x17");
        // The nonce moved on: the same record does not open twice.
        let (ct, tag) = sealed.split_at(5);
        assert!(rx1.open_into(&header, ct, tag, &mut out).is_err());
        assert_eq!((tx.seq(), rx1.seq()), (6, 7));
    }

    #[test]
    fn a_changed_header_or_byte_fails_to_open() {
        let header = [23, 3, 3, 0, 21];
        let mut tx = key(0);
        let mut sealed = *b"pong\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let (body, tail) = sealed.split_at_mut(4);
        tx.seal_in_place(&header, body, 23, tail).unwrap();
        let (ct, tag) = sealed.split_at(5);
        let mut out = [0u8; 5];
        assert!(
            key(0)
                .open_into(&[23, 3, 3, 0, 22], ct, tag, &mut out)
                .is_err()
        );
        let mut bad = sealed;
        bad[2] ^= 1;
        let (ct, tag) = bad.split_at(5);
        assert!(key(0).open_into(&header, ct, tag, &mut out).is_err());
        let (ct, tag) = sealed.split_at(5);
        key(0).open_into(&header, ct, tag, &mut out).unwrap();
        assert_eq!(&out, b"pong\x17");
    }
}
