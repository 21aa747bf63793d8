/* The C test program: libunid against a real agent (scripts/test-capi.sh starts one).
 *
 *   test_unid SEQUENCE RING_DIR SOCKET NO_AGENT_SOCKET
 *
 * Two threads with a handle each take ids (unid_next and unid_take_range):
 * every thread's ids increase, no id is seen twice; a fork child's ids are
 * new too; the errors (no agent, bad name, NULL, count 0) have their codes
 * and messages. Prints "N passed, M failed" last; exits 1 on a failure. */
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "unid.h"

#define PER_THREAD 50000
#define FORK_IDS 2000

static const char *sequence, *ring_dir, *sock, *no_agent;
static int passed, failed;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (cond) {                                            \
      passed++;                                            \
    } else {                                               \
      failed++;                                            \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fprintf(stderr, "\n");                               \
    }                                                      \
  } while (0)

struct run {
  uint64_t ids[PER_THREAD + 16];
  size_t n;
  int rc;
  char err[512];
};

static int lt(unid_id a, unid_id b) { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo); }

/* Takes at least `want` ids into r->ids (low halves: 8-byte sequence) with both calls. */
static void take(unid_t *h, struct run *r, size_t want) {
  r->n = 0;
  r->rc = UNID_OK;
  while (r->n < want) {
    unid_id id;
    int rc = unid_next(h, &id);
    if (rc == UNID_OK) {
      r->ids[r->n++] = id.lo;
      uint64_t count = 0;
      rc = unid_take_range(h, 15, &id, &count);
      for (uint64_t i = 0; rc == UNID_OK && i < count && r->n < want + 16; i++) {
        r->ids[r->n++] = id.lo + i;
      }
    }
    if (rc != UNID_OK) {
      r->rc = rc;
      snprintf(r->err, sizeof r->err, "%s", unid_error_message());
      return;
    }
  }
}

static void *thread_main(void *arg) {
  struct run *r = arg;
  unid_t *h = NULL;
  r->rc = unid_open_with(sequence, ring_dir, sock, -1, &h);
  if (r->rc != UNID_OK) {
    snprintf(r->err, sizeof r->err, "%s", unid_error_message());
    return NULL;
  }
  take(h, r, PER_THREAD);
  unid_close(h);
  return NULL;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static int increasing(const uint64_t *v, size_t n) {
  for (size_t i = 1; i < n; i++)
    if (v[i - 1] >= v[i]) return 0;
  return 1;
}

/* A handle used before fork(), then in the child and the parent at once: each side's ids
 * increase, the child's are above what the parent had before the fork. The ids go to
 * *child and *parent. With `dir` an empty folder the handle is on the agent's socket (whose
 * connection the child must not share). */
static void fork_check(const char *dir, int via_ring, struct run *child, struct run *parent) {
  unid_t *h = NULL;
  int rc = unid_open_with(sequence, dir, sock, -1, &h);
  CHECK(rc == UNID_OK, "open: %d %s", rc, unid_error_message());
  if (rc != UNID_OK) return;
  CHECK(unid_via_ring(h) == via_ring, "via ring %d, expected %d", unid_via_ring(h), via_ring);
  unid_id before;
  CHECK(unid_next(h, &before) == UNID_OK, "next before fork: %s", unid_error_message());
  CHECK(unid_width(h) == 8, "width %d", unid_width(h));
  int pipefd[2];
  CHECK(pipe(pipefd) == 0, "pipe");
  pid_t pid = fork();
  if (pid == 0) {
    take(h, child, FORK_IDS);
    size_t n = child->rc == UNID_OK ? child->n : 0;
    ssize_t w = write(pipefd[1], &n, sizeof n);
    w += write(pipefd[1], child->ids, n * sizeof child->ids[0]);
    _exit(w > 0 && n > 0 ? 0 : 1);
  }
  close(pipefd[1]);
  take(h, parent, FORK_IDS);
  size_t child_n = 0, got = 0;
  if (read(pipefd[0], &child_n, sizeof child_n) == sizeof child_n && child_n <= PER_THREAD) {
    while (got < child_n * sizeof(uint64_t)) {
      ssize_t r = read(pipefd[0], (char *)child->ids + got, child_n * sizeof(uint64_t) - got);
      if (r <= 0) break;
      got += (size_t)r;
    }
  }
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  child->n = got / sizeof(uint64_t);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork child (ring %d) status %d", via_ring,
        status);
  CHECK(child->n >= FORK_IDS, "fork child took %zu ids", child->n);
  CHECK(increasing(child->ids, child->n), "fork child: ids not increasing");
  CHECK(parent->rc == UNID_OK && increasing(parent->ids, parent->n), "parent after fork: %d %s",
        parent->rc, parent->err);
  CHECK(child->n == 0 || child->ids[0] > before.lo, "child's first id not above the parent's");
  unid_close(h);
}

static struct run runs[6];

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s SEQUENCE RING_DIR SOCKET NO_AGENT_SOCKET\n", argv[0]);
    return 2;
  }
  sequence = argv[1], ring_dir = argv[2], sock = argv[3], no_agent = argv[4];

  /* Two threads, a handle each. */
  pthread_t t[2];
  for (int k = 0; k < 2; k++) pthread_create(&t[k], NULL, thread_main, &runs[k]);
  for (int k = 0; k < 2; k++) pthread_join(t[k], NULL);
  for (int k = 0; k < 2; k++) {
    CHECK(runs[k].rc == UNID_OK, "thread %d: code %d: %s", k, runs[k].rc, runs[k].err);
    CHECK(runs[k].n >= PER_THREAD, "thread %d took %zu ids", k, runs[k].n);
    CHECK(increasing(runs[k].ids, runs[k].n), "thread %d: ids not increasing", k);
  }

  /* fork() with the handle on the ring, then on the socket. */
  char empty[] = "/tmp/unid-capi-empty-XXXXXX";
  CHECK(mkdtemp(empty) != NULL, "mkdtemp");
  fork_check(ring_dir, 1, &runs[2], &runs[3]);
  fork_check(empty, 0, &runs[4], &runs[5]);

  /* No id seen twice across the threads, the child and the parent. */
  size_t total = 0;
  for (int k = 0; k < 6; k++) total += runs[k].n;
  uint64_t *all = malloc(total * sizeof *all);
  size_t at = 0;
  for (int k = 0; k < 6; k++) {
    memcpy(all + at, runs[k].ids, runs[k].n * sizeof *all);
    at += runs[k].n;
  }
  qsort(all, total, sizeof *all, cmp_u64);
  CHECK(increasing(all, total), "an id was handed out twice among %zu", total);
  free(all);

  /* 128-bit helpers. */
  unid_id big = {.lo = 5, .hi = 1};
  char buf[40];
  CHECK(unid_id_format(big, buf, sizeof buf) == 20 && strcmp(buf, "18446744073709551621") == 0,
        "unid_id_format gave %s", buf);
#ifdef __SIZEOF_INT128__
  CHECK(unid_id_u128(big) == ((unsigned __int128)1 << 64) + 5, "unid_id_u128");
#endif
  CHECK(lt(runs[0].ids[0] == 0 ? big : (unid_id){.lo = runs[0].ids[0]}, big), "lt");

  /* Errors. */
  unid_t *none = NULL, *h = NULL;
  unid_id first;
  int rc = unid_open_with(sequence, empty, no_agent, -1, &none);
  CHECK(rc == UNID_AGENT_NOT_RUNNING && none == NULL, "no agent: code %d", rc);
  CHECK(strstr(unid_error_message(), "no unid agent serves sequence") != NULL, "message: %s",
        unid_error_message());
  rmdir(empty);
  rc = unid_open_with("bad name", ring_dir, sock, -1, &none);
  CHECK(rc == UNID_INVALID_NAME, "bad name: code %d", rc);
  CHECK(strstr(unid_error_message(), "invalid sequence name") != NULL, "message: %s",
        unid_error_message());
  CHECK(unid_open(NULL, &none) == UNID_INVALID_ARGUMENT, "NULL sequence");
  CHECK(unid_next(NULL, &first) == UNID_INVALID_ARGUMENT, "NULL handle");
  CHECK(unid_open_with(sequence, ring_dir, "not an address", -1, &none) == UNID_INVALID_ARGUMENT,
        "bad socket");
  rc = unid_open_with(sequence, ring_dir, sock, -1, &h);
  uint64_t count = 0;
  CHECK(rc == UNID_OK && unid_take_range(h, 0, &first, &count) == UNID_BAD_COUNT, "count 0");
  unid_close(h);
  unid_close(NULL);

  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
