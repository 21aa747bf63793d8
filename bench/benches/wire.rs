//! The wire format (`unid-proto`): encode and decode of the two datagrams on the grant path
//! (`BlockRequest` from an agent, `BlockGrant` from the leader), against references measured
//! in the same group: CRC32 over the same bytes (every datagram pays it once each way) and a
//! copy of the datagram into a buffer.
//!
//! `nice -n 10 cargo bench -p unid-bench --bench wire`
#![allow(missing_docs)] // `criterion_group!` generates an undocumented pub fn

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use std::time::Duration;
use unid_proto::{AuthKey, Block, Codec, DATAGRAM_BYTES_MAX, Header, Message, Width, decode};

fn header() -> Header {
    Header {
        sender: 7,
        seq: 123_456,
        reply_to: 123_400,
        epoch: 3,
    }
}

fn grant() -> Message<'static> {
    Message::BlockGrant {
        sequence: "orders",
        width: Width::W8,
        block: Block::new(1 << 40, 1 << 20, Width::W8).expect("valid block"),
    }
}

fn request() -> Message<'static> {
    Message::BlockRequest {
        sequence: "orders",
        count: 4096,
    }
}

fn codec_group(c: &mut Criterion, name: &str, msg: &Message<'static>) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    let mut codec = Codec::new();
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let n = codec
        .encode(&header(), msg, None, &mut buf)
        .expect("encodes");
    let datagram = buf[..n].to_vec();
    let key = AuthKey::from_secret(b"bench secret, 32 bytes or more..");
    let mut abuf = [0u8; DATAGRAM_BYTES_MAX];
    let an = codec
        .encode(&header(), msg, Some(&key), &mut abuf)
        .expect("encodes");
    let authed = abuf[..an].to_vec();

    // References: what any framing costs on these bytes.
    g.bench_function("ref_crc32", |b| {
        b.iter(|| crc32fast::hash(black_box(&datagram)))
    });
    let mut copy = [0u8; DATAGRAM_BYTES_MAX];
    g.bench_function("ref_copy", |b| {
        b.iter(|| {
            copy[..n].copy_from_slice(black_box(&datagram));
            black_box(&copy);
        })
    });
    g.bench_function("encode", |b| {
        b.iter(|| {
            codec
                .encode(black_box(&header()), black_box(msg), None, &mut buf)
                .expect("encodes")
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| decode(black_box(&datagram), None).expect("decodes").header)
    });
    g.bench_function("encode_mac", |b| {
        b.iter(|| {
            codec
                .encode(black_box(&header()), black_box(msg), Some(&key), &mut abuf)
                .expect("encodes")
        })
    });
    g.bench_function("decode_mac", |b| {
        b.iter(|| {
            decode(black_box(&authed), Some(&key))
                .expect("decodes")
                .header
        })
    });
    g.finish();
}

fn wire(c: &mut Criterion) {
    codec_group(c, "wire_block_request", &request());
    codec_group(c, "wire_block_grant", &grant());
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = wire }
criterion_main!(benches);
