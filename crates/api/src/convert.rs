//! Conversions between wire messages and the domain model.

use berth_types as t;

use crate::pb;

/// A request that cannot be turned into a domain value. Maps to `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError(pub String);

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConvertError {}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.0)
    }
}

impl From<t::KeyValue> for pb::KeyValue {
    fn from(kv: t::KeyValue) -> Self {
        pb::KeyValue {
            key: kv.key,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: kv.value,
        }
    }
}

impl From<pb::KeyValue> for t::KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        t::KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

pub fn range_query_from_pb(r: &pb::RangeRequest) -> Result<t::RangeQuery, ConvertError> {
    if r.limit < 0 {
        return Err(ConvertError(format!("limit must be >= 0, got {}", r.limit)));
    }
    if r.revision < 0 {
        return Err(ConvertError(format!("revision must be >= 0, got {}", r.revision)));
    }
    Ok(t::RangeQuery {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        limit: r.limit,
        revision: r.revision,
        keys_only: r.keys_only,
        count_only: r.count_only,
    })
}

fn op_from_pb(op: pb::RequestOp) -> Result<t::RequestOp, ConvertError> {
    use pb::request_op::Request;
    match op.request {
        Some(Request::RequestRange(r)) => Ok(t::RequestOp::Range(range_query_from_pb(&r)?)),
        Some(Request::RequestPut(p)) => {
            Ok(t::RequestOp::Put(t::Put { key: p.key, value: p.value, prev_kv: p.prev_kv }))
        }
        Some(Request::RequestDeleteRange(d)) => {
            Ok(t::RequestOp::DeleteRange(t::DeleteRange { key: d.key, range_end: d.range_end, prev_kv: d.prev_kv }))
        }
        None => Err(ConvertError("a transaction op has no request set".into())),
    }
}

fn compare_from_pb(c: pb::Compare) -> Result<t::Compare, ConvertError> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let op = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => t::CompareOp::Equal,
        Ok(CompareResult::NotEqual) => t::CompareOp::NotEqual,
        Ok(CompareResult::Greater) => t::CompareOp::Greater,
        Ok(CompareResult::Less) => t::CompareOp::Less,
        Err(_) => return Err(ConvertError(format!("unknown compare result {}", c.result))),
    };
    let target =
        CompareTarget::try_from(c.target).map_err(|_| ConvertError(format!("unknown compare target {}", c.target)))?;
    let target = match (target, c.target_union) {
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => t::CompareTarget::Version(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => t::CompareTarget::CreateRevision(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => t::CompareTarget::ModRevision(v),
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => t::CompareTarget::Value(v),
        // proto3 drops zero values of oneof members only when unset; treat "unset" as zero.
        (CompareTarget::Version, None) => t::CompareTarget::Version(0),
        (CompareTarget::Create, None) => t::CompareTarget::CreateRevision(0),
        (CompareTarget::Mod, None) => t::CompareTarget::ModRevision(0),
        (CompareTarget::Value, None) => t::CompareTarget::Value(vec![]),
        (target, Some(_)) => {
            return Err(ConvertError(format!(
                "compare target {target:?} does not match the value given in target_union"
            )));
        }
    };
    Ok(t::Compare { key: c.key, op, target })
}

pub fn txn_from_pb(r: pb::TxnRequest) -> Result<t::Txn, ConvertError> {
    Ok(t::Txn {
        compare: r.compare.into_iter().map(compare_from_pb).collect::<Result<_, _>>()?,
        success: r.success.into_iter().map(op_from_pb).collect::<Result<_, _>>()?,
        failure: r.failure.into_iter().map(op_from_pb).collect::<Result<_, _>>()?,
    })
}

pub fn range_result_to_pb(r: t::RangeResult, header: &pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(header.clone()),
        kvs: r.kvs.into_iter().map(Into::into).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn txn_result_to_pb(r: t::TxnResult, header: &pb::ResponseHeader) -> pb::TxnResponse {
    use pb::response_op::Response;
    let responses = r
        .responses
        .into_iter()
        .map(|op| pb::ResponseOp {
            response: Some(match op {
                t::OpResult::Range(rr) => Response::ResponseRange(range_result_to_pb(rr, header)),
                t::OpResult::Put(p) => Response::ResponsePut(pb::PutResponse {
                    header: Some(header.clone()),
                    prev_kv: p.prev_kv.map(Into::into),
                }),
                t::OpResult::DeleteRange(d) => Response::ResponseDeleteRange(pb::DeleteRangeResponse {
                    header: Some(header.clone()),
                    deleted: d.deleted,
                    prev_kvs: d.prev_kvs.into_iter().map(Into::into).collect(),
                }),
            }),
        })
        .collect();
    pb::TxnResponse { header: Some(header.clone()), succeeded: r.succeeded, responses }
}

impl From<t::Event> for pb::Event {
    fn from(e: t::Event) -> Self {
        pb::Event {
            r#type: match e.kind {
                t::EventKind::Put => pb::event::EventType::Put as i32,
                t::EventKind::Delete => pb::event::EventType::Delete as i32,
            },
            kv: Some(e.kv.into()),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_target_mismatch_is_rejected() {
        let c = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Mod as i32,
            key: b"k".to_vec(),
            target_union: Some(pb::compare::TargetUnion::Value(b"v".to_vec())),
        };
        let err = txn_from_pb(pb::TxnRequest { compare: vec![c], ..Default::default() }).unwrap_err();
        assert!(err.0.contains("does not match"));
    }

    #[test]
    fn empty_op_is_rejected() {
        let r = pb::TxnRequest { success: vec![pb::RequestOp { request: None }], ..Default::default() };
        assert!(txn_from_pb(r).is_err());
    }
}
