//! Is an EFI binary signed by a certificate the firmware trusts? The Authenticode check that
//! firmware does in LoadImage, done before an install or upgrade writes anything: the PE's
//! Authenticode SHA-256 digest must be the one the signature carries, the signature must
//! verify with the signer's certificate, and that certificate must be one of the trusted
//! ones (the firmware's `db`) or be signed by one. Also reads `db` itself (an
//! `EFI_SIGNATURE_LIST` sequence). Pure: bytes in, verdict out.

use authenticode::{AttributeCertificateIterator, PeOffsets, PeTrait};
use der::{Decode, Encode};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use crate::pe::Pe;

/// EFI_CERT_X509_GUID (a5c059a1-94e4-4aa7-87b5-ab155c2bf072) as stored.
const CERT_X509_GUID: [u8; 16] = [
    0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72,
];
/// EFI_CERT_SHA256_GUID (c1c41626-504c-4092-aca9-41f936934328) as stored: an image's
/// Authenticode SHA-256 digest (how `dbx` revokes one binary).
const CERT_SHA256_GUID: [u8; 16] = [
    0x26, 0x16, 0xc4, 0xc1, 0x4c, 0x50, 0x92, 0x40, 0xac, 0xa9, 0x41, 0xf9, 0x36, 0x93, 0x43, 0x28,
];
const OID_SHA256: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const OID_MESSAGE_DIGEST: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigError {
    #[error("not a PE32+ image: {0}")]
    Pe(String),
    #[error("it is not signed")]
    Unsigned,
    #[error("its signature is malformed: {0}")]
    Malformed(String),
    #[error("it was changed after it was signed (its Authenticode digest is not the signed one)")]
    Changed,
    #[error("its signature does not verify with the signer's certificate ({signer})")]
    BadSignature { signer: String },
    #[error("it is signed by {signer}, but the firmware trusts {}", if trusted.is_empty() { "no certificate (db is empty)".to_string() } else { trusted.join(", ") })]
    NotTrusted {
        signer: String,
        trusted: Vec<String>,
    },
    #[error("the firmware's dbx revokes it ({0})")]
    Revoked(String),
}

/// What a signature database (`db` or `dbx`) holds: certificates and image digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignatureLists {
    pub certs: Vec<Certificate>,
    /// Authenticode SHA-256 digests of single images.
    pub sha256: Vec<[u8; 32]>,
}

/// Who signed an image that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The signer's certificate subject.
    pub signer: String,
    /// The trusted certificate it is, or was issued by.
    pub trusted_by: String,
}

/// The subject of a certificate, as `CN=…,O=…`.
pub fn subject(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

/// Certificates from an `EFI_SIGNATURE_LIST` sequence (the `db` variable's value without
/// its attribute bytes); other signature types (hashes) are skipped. Bounded by the input.
pub fn parse_signature_lists(data: &[u8]) -> Result<Vec<Certificate>, SigError> {
    Ok(parse_all_signature_lists(data)?.certs)
}

/// Certificates and SHA-256 image digests from an `EFI_SIGNATURE_LIST` sequence (`db`,
/// `dbx`); other signature types are skipped. Bounded by the input.
pub fn parse_all_signature_lists(mut data: &[u8]) -> Result<SignatureLists, SigError> {
    let bad = |why: &str| SigError::Malformed(format!("signature list: {why}"));
    let mut out = SignatureLists::default();
    while !data.is_empty() {
        if data.len() < 28 {
            return Err(bad("truncated header"));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let (list, header, size) = (
            u32_at(16) as usize,
            u32_at(20) as usize,
            u32_at(24) as usize,
        );
        if list < 28 + header || list > data.len() || size < 16 {
            return Err(bad("sizes out of bounds"));
        }
        if data[..16] == CERT_X509_GUID {
            let body = &data[28 + header..list];
            if !body.len().is_multiple_of(size) {
                return Err(bad("signature size does not divide the list"));
            }
            for sig in body.chunks(size) {
                // 16 bytes of owner GUID, then the DER certificate.
                let cert = Certificate::from_der(&sig[16..])
                    .map_err(|e| bad(&format!("certificate: {e}")))?;
                out.certs.push(cert);
            }
        } else if data[..16] == CERT_SHA256_GUID {
            if size != 48 {
                return Err(bad("a SHA-256 entry is not 48 bytes"));
            }
            let body = &data[28 + header..list];
            if !body.len().is_multiple_of(size) {
                return Err(bad("signature size does not divide the list"));
            }
            for sig in body.chunks(size) {
                let mut d = [0u8; 32];
                d.copy_from_slice(&sig[16..48]);
                out.sha256.push(d);
            }
        }
        data = &data[list..];
    }
    Ok(out)
}

/// `PeTrait` over our own parser (authenticode needs the offsets of the fields the digest
/// skips).
struct PeView<'a> {
    data: &'a [u8],
    pe: Pe,
}

impl PeTrait for PeView<'_> {
    fn data(&self) -> &[u8] {
        self.data
    }

    fn num_sections(&self) -> usize {
        self.pe.sections.len()
    }

    fn section_data_range(
        &self,
        index: usize,
    ) -> Result<std::ops::Range<usize>, authenticode::PeOffsetError> {
        let s = self
            .pe
            .sections
            .get(index.wrapping_sub(1))
            .ok_or(authenticode::PeOffsetError)?;
        let start = s.raw_offset as usize;
        Ok(start..start + s.raw_size as usize)
    }

    fn certificate_table_range(
        &self,
    ) -> Result<Option<std::ops::Range<usize>>, authenticode::PeOffsetError> {
        Ok(self
            .pe
            .security
            .map(|(off, size)| off as usize..off as usize + size as usize))
    }

    fn offsets(&self) -> Result<PeOffsets, authenticode::PeOffsetError> {
        let opt = self.pe.optional_header_offset();
        Ok(PeOffsets {
            check_sum: opt + 64,
            after_check_sum: opt + 68,
            security_data_dir: opt + 112 + 4 * 8,
            after_security_data_dir: opt + 112 + 5 * 8,
            after_header: self.pe.size_of_headers as usize,
        })
    }
}

fn rsa_verify(cert: &Certificate, message: &[u8], sig: &[u8]) -> bool {
    let Ok(spki) = cert.tbs_certificate.subject_public_key_info.to_der() else {
        return false;
    };
    let Ok(key) = <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki)
    else {
        return false;
    };
    let Ok(sig) = Signature::try_from(sig) else {
        return false;
    };
    VerifyingKey::<Sha256>::new(key)
        .verify(message, &sig)
        .is_ok()
}

/// `issued` was signed by `issuer`'s key (sha256WithRSAEncryption).
fn issued_by(issued: &Certificate, issuer: &Certificate) -> bool {
    let Ok(tbs) = issued.tbs_certificate.to_der() else {
        return false;
    };
    issued.tbs_certificate.issuer == issuer.tbs_certificate.subject
        && issued
            .signature
            .as_bytes()
            .is_some_and(|s| rsa_verify(issuer, &tbs, s))
}

/// Verifies `image` against the firmware's `db` certificates and its `dbx`: refused when
/// dbx holds the image's digest, its signer, or the db certificate that trusts it.
pub fn verify_not_revoked(
    image: &[u8],
    db: &[Certificate],
    dbx: &SignatureLists,
) -> Result<Signed, SigError> {
    let (signed, digest, chain) = verify_inner(image, db)?;
    if dbx.sha256.contains(&digest) {
        return Err(SigError::Revoked(format!(
            "its digest {}",
            crate::pcr::hex(&digest)
        )));
    }
    for c in &chain {
        if dbx.certs.contains(c) {
            return Err(SigError::Revoked(format!("certificate {}", subject(c))));
        }
    }
    Ok(signed)
}

/// Verifies `image` against the `trusted` certificates (the firmware's db).
pub fn verify(image: &[u8], trusted: &[Certificate]) -> Result<Signed, SigError> {
    verify_inner(image, trusted).map(|(s, _, _)| s)
}

/// The verdict, the image's Authenticode digest, and the certificates that carried the trust
/// (the signer, and the db certificate).
fn verify_inner(
    image: &[u8],
    trusted: &[Certificate],
) -> Result<(Signed, [u8; 32], Vec<Certificate>), SigError> {
    let pe = Pe::parse(image).map_err(|e| SigError::Pe(e.to_string()))?;
    if pe.security.is_none() {
        return Err(SigError::Unsigned);
    }
    let view = PeView { data: image, pe };
    let malformed = |e: &dyn std::fmt::Debug| SigError::Malformed(format!("{e:?}"));
    let first = AttributeCertificateIterator::new(&view)
        .map_err(|e| malformed(&e))?
        .ok_or(SigError::Unsigned)?
        .next()
        .ok_or(SigError::Unsigned)?
        .map_err(|e| malformed(&e))?;
    let sig = first
        .get_authenticode_signature()
        .map_err(|e| malformed(&e))?;
    if sig.digest_algorithm().oid != OID_SHA256 {
        return Err(SigError::Malformed(format!(
            "digest algorithm {} (only SHA-256 is accepted)",
            sig.digest_algorithm().oid
        )));
    }
    let mut h = Sha256::new();
    authenticode::authenticode_digest(&view, &mut h).map_err(|e| malformed(&e))?;
    let digest: [u8; 32] = h.finalize().into();
    if digest.as_slice() != sig.digest() {
        return Err(SigError::Changed);
    }
    // The signer's certificate, by issuer and serial number.
    let si = sig.signer_info();
    let cms::signed_data::SignerIdentifier::IssuerAndSerialNumber(id) = &si.sid else {
        return Err(SigError::Malformed("signer named by key id".into()));
    };
    let signer = sig
        .certificates()
        .find(|c| {
            c.tbs_certificate.issuer == id.issuer
                && c.tbs_certificate.serial_number == id.serial_number
        })
        .ok_or_else(|| SigError::Malformed("the signer's certificate is not included".into()))?;
    let name = subject(signer);
    // Signed attributes: their messageDigest is the hash of the signed content, and the
    // signature covers their DER (as a SET OF).
    let attrs = si
        .signed_attrs
        .as_ref()
        .ok_or_else(|| SigError::Malformed("no signed attributes".into()))?;
    let md = attrs
        .iter()
        .find(|a| a.oid == OID_MESSAGE_DIGEST)
        .and_then(|a| a.values.iter().next())
        .and_then(|v| v.decode_as::<der::asn1::OctetString>().ok())
        .ok_or_else(|| SigError::Malformed("no messageDigest attribute".into()))?;
    let content = sig
        .encapsulated_content()
        .ok_or_else(|| SigError::Malformed("no signed content".into()))?;
    if md.as_bytes() != Sha256::digest(content).as_slice() {
        return Err(SigError::Changed);
    }
    let attrs_der = attrs.to_der().map_err(|e| malformed(&e))?;
    if !rsa_verify(signer, &attrs_der, sig.signature()) {
        return Err(SigError::BadSignature { signer: name });
    }
    let signer_der = signer.to_der().map_err(|e| malformed(&e))?;
    for t in trusted {
        if t.to_der().is_ok_and(|d| d == signer_der) || issued_by(signer, t) {
            let signed = Signed {
                signer: name,
                trusted_by: subject(t),
            };
            return Ok((signed, digest, vec![signer.clone(), t.clone()]));
        }
    }
    Err(SigError::NotTrusted {
        signer: name,
        trusted: trusted.iter().map(subject).collect(),
    })
}
