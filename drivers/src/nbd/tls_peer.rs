//! The identity a TLS server hands to its authorization object (`tls-authz`): the
//! distinguished name of the client's x509 certificate, written as GnuTLS writes it for QEMU
//! (so rules written for qemu-nbd match here too): the attributes in certificate order,
//! `TYPE=value` joined by `,`, with `,` `+` `"` `\` `<` `>` `;` escaped by a backslash (and a
//! leading `#` or space, a trailing space). Known attribute types by their short names (`CN`,
//! `C`, `L`, `ST`, `O`, `OU`, `DC`, `UID`, `EMAIL`, ...), others by their dotted OIDs; a value
//! that is not text is written `#` and its bytes in hex. Where GnuTLS would write a name
//! differently (an unknown attribute type, whose value it writes as hex DER; an attribute of a
//! multi-valued RDN, which it joins with `+` where this writes `,`), no rule written for it
//! matches here, so such a client is refused, never let in by mistake.

use openssl::nid::Nid;
use openssl::x509::X509;

/// The subject DN of a DER certificate; `None` when it does not parse.
pub fn subject_dn(der: &[u8]) -> Option<String> {
    let cert = X509::from_der(der).ok()?;
    let mut out = Vec::new();
    for e in cert.subject_name().entries() {
        let nid = e.object().nid();
        let name = match nid {
            Nid::PKCS9_EMAILADDRESS => Some("EMAIL".to_string()),
            Nid::USERID => Some("UID".to_string()),
            Nid::UNDEF => None,
            n => n.short_name().ok().map(str::to_string),
        };
        // UTF8String, PrintableString and IA5String values are their text; others (BMPString,
        // a NUL inside) are not taken as text.
        let value = std::str::from_utf8(e.data().as_slice()).ok().filter(|s| !s.contains('\0')).map(str::to_string);
        let name = name.unwrap_or_else(|| e.object().to_string());
        match value {
            Some(v) => out.push(format!("{name}={}", escape(&v))),
            None => {
                let hex: String = e.data().as_slice().iter().map(|b| format!("{b:02x}")).collect();
                out.push(format!("{name}=#{hex}"));
            }
        }
    }
    Some(out.join(","))
}

/// RFC 4514 escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_rfc_4514() {
        assert_eq!(escape("Example Org, Ltd"), "Example Org\\, Ltd");
        assert_eq!(escape("#x y "), "\\#x y\\ ");
        assert_eq!(escape("a+b;c<d>e\"f\\"), "a\\+b\\;c\\<d\\>e\\\"f\\\\");
    }

    #[test]
    fn garbage_is_no_name() {
        assert_eq!(subject_dn(b"not a certificate"), None);
    }
}
