//! Takes ids from the local agent and prints them.
//!
//! ```sh
//! unid agent --server 127.0.0.1 --sequence orders &     # or `unid dev`
//! cargo run -p unid --example next_ids -- orders 5
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let sequence = args.next().unwrap_or_else(|| "default".to_owned());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);

    let mut ids = unid::Unid::open(&sequence)?;
    let first = ids.next()?;
    println!(
        "{sequence}: {first} (width {} bytes, via {})",
        first.width().bytes(),
        if ids.via_ring() {
            "shared-memory ring"
        } else {
            "agent socket"
        }
    );
    if n > 1 {
        for id in ids.take(n - 1)? {
            println!("{id}");
        }
    }
    Ok(())
}
