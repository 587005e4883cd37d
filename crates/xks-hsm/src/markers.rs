//! Marker objects: small private data objects in the token that carry a
//! state every proxy instance sharing the token must see.
//!
//! `keys disable` keeps its state this way (see [`super::state`]), and so
//! do the fleet-wide kill switch (`xks-proxy lockdown`, see the `lockdown`
//! layer) and the audit trail's witness of its newest seal (see
//! `audit::witness`): the token is the one thing all instances of a fleet
//! share, its objects survive restarts (and cannot be changed without the
//! HSM), and creating, finding and destroying a data object are calls every
//! module implements correctly.
//!
//! A kind of marker is named by its `CKA_APPLICATION`, so one
//! `C_FindObjects` lists all markers of that kind whatever their labels
//! (PKCS#11 cannot search by label prefix). What a marker means is the
//! caller's business: this layer stores and returns labels and values.

use cryptoki::error::Error as P11Error;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// One marker: its label and value, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub label: String,
    pub value: Vec<u8>,
}

/// The markers of one kind (any kind: `None`) with this label (any: `None`).
pub(crate) fn handles(
    session: &Session,
    application: Option<&[u8]>,
    label: Option<&str>,
) -> Result<Vec<ObjectHandle>, P11Error> {
    let mut template = vec![Attribute::Class(ObjectClass::DATA)];
    if let Some(a) = application {
        template.push(Attribute::Application(a.to_vec()));
    }
    if let Some(l) = label {
        template.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    session.find_objects(&template)
}

/// Every marker of one kind, sorted by label.
pub(crate) fn list(session: &Session, application: &[u8]) -> Result<Vec<Marker>, P11Error> {
    let mut out = Vec::new();
    for h in handles(session, Some(application), None)? {
        let mut m = Marker {
            label: String::new(),
            value: Vec::new(),
        };
        for a in session.get_attributes(h, &[AttributeType::Label, AttributeType::Value])? {
            match a {
                Attribute::Label(l) => m.label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Value(v) => m.value = v,
                _ => {}
            }
        }
        out.push(m);
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(out)
}

/// Stores a marker, replacing any of the same kind and label: first the
/// new one is created, then the old ones are destroyed, so the token never
/// goes without one in between.
pub(crate) fn put(
    session: &Session,
    application: &[u8],
    label: &str,
    value: &[u8],
) -> Result<(), P11Error> {
    let old = handles(session, Some(application), Some(label))?;
    session.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Application(application.to_vec()),
        Attribute::Value(value.to_vec()),
    ])?;
    for h in old {
        session.destroy_object(h)?;
    }
    Ok(())
}

/// Removes the markers of one kind with this label, or all of that kind;
/// returns how many were removed.
pub(crate) fn remove(
    session: &Session,
    application: &[u8],
    label: Option<&str>,
) -> Result<usize, P11Error> {
    let found = handles(session, Some(application), label)?;
    for h in &found {
        session.destroy_object(*h)?;
    }
    Ok(found.len())
}
