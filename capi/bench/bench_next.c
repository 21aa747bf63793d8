/* unid_next() per second from C (scripts/bench-clients.sh compares it with the Rust client).
 *
 *   bench_next SEQUENCE RING_DIR SOCKET SLICES MS
 *
 * Prints one "unid_next() IDS_PER_S" line per slice of MS milliseconds. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "unid.h"

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s SEQUENCE RING_DIR SOCKET SLICES MS\n", argv[0]);
    return 2;
  }
  int slices = atoi(argv[4]);
  double ms = atof(argv[5]);
  unid_t *h = NULL;
  if (unid_open_with(argv[1], argv[2], argv[3], -1, &h) != UNID_OK || !unid_via_ring(h)) {
    fprintf(stderr, "bench_next: %s\n", h ? "not on the ring" : unid_error_message());
    return 1;
  }
  unid_id id, last = {0, 0};
  for (int s = 0; s < slices; s++) {
    double t0 = now_s(), end = t0 + ms / 1000, t;
    unsigned long calls = 0;
    do {
      for (int i = 0; i < 1000; i++) {
        if (unid_next(h, &id) != UNID_OK) {
          fprintf(stderr, "bench_next: %s\n", unid_error_message());
          return 1;
        }
      }
      calls += 1000;
      t = now_s();
    } while (t < end);
    if (id.lo <= last.lo && id.hi == last.hi) return 1; /* keeps the loop honest */
    last = id;
    printf("unid_next()\t%.0f\n", (double)calls / (t - t0));
  }
  unid_close(h);
  return 0;
}
