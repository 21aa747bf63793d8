/* A reader of the unid ring layout that shares no code with the Rust crate (see
 * ring/src/layout.rs for the table this follows). Usage: layout_check FILE WIDTH CAPACITY.
 * Checks the header, then takes one id with the documented protocol and prints
 * "ok id=<hi>:<lo> tail=<tail>". Exit 1 with a message on any mismatch. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_SIZE 384u
#define SLOT_SIZE 32u
#define OFF_MAGIC 0
#define OFF_VERSION 8
#define OFF_WIDTH 12
#define OFF_CAPACITY 16
#define OFF_HEADER_SIZE 24
#define OFF_SLOT_SIZE 28
#define OFF_FILE_SIZE 32
#define OFF_PID 40
#define OFF_FLAGS 44
#define OFF_HEARTBEAT 48
#define OFF_HEAD 128
#define OFF_TAIL 256
#define OFFSET_BITS 20
#define OFFSET_MASK ((1ull << OFFSET_BITS) - 1)

static int fail(const char *what) {
    fprintf(stderr, "layout mismatch: %s\n", what);
    return 1;
}

static uint64_t ld64(const unsigned char *base, size_t off) {
    return __atomic_load_n((const uint64_t *)(base + off), __ATOMIC_ACQUIRE);
}

static uint32_t ld32(const unsigned char *base, size_t off) {
    return __atomic_load_n((const uint32_t *)(base + off), __ATOMIC_ACQUIRE);
}

int main(int argc, char **argv) {
    if (argc != 4) return fail("usage: layout_check FILE WIDTH CAPACITY");
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) return fail("open");
    struct stat st;
    if (fstat(fd, &st) != 0) return fail("fstat");
    unsigned char *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return fail("mmap");
    uint64_t width = strtoull(argv[2], NULL, 10), cap = strtoull(argv[3], NULL, 10);

    if (memcmp(m + OFF_MAGIC, "UNIDRING", 8) != 0) return fail("magic");
    if (ld32(m, OFF_VERSION) != 1) return fail("version");
    if (m[OFF_WIDTH] != width) return fail("width");
    if (m[13] || m[14] || m[15]) return fail("pad after width");
    if (ld64(m, OFF_CAPACITY) != cap) return fail("capacity");
    if (ld32(m, OFF_HEADER_SIZE) != HEADER_SIZE) return fail("header_size");
    if (ld32(m, OFF_SLOT_SIZE) != SLOT_SIZE) return fail("slot_size");
    if (ld64(m, OFF_FILE_SIZE) != HEADER_SIZE + cap * SLOT_SIZE) return fail("file_size field");
    if ((uint64_t)st.st_size != HEADER_SIZE + cap * SLOT_SIZE) return fail("file size");
    if (ld32(m, OFF_PID) == 0) return fail("agent pid");
    if (ld32(m, OFF_FLAGS) != 0) return fail("flags");
    if (ld64(m, OFF_HEARTBEAT) == 0) return fail("heartbeat");
    uint64_t tail = ld64(m, OFF_TAIL);

    /* take(1), as in ring/src/raw.rs */
    uint64_t *headp = (uint64_t *)(m + OFF_HEAD);
    uint64_t head = __atomic_load_n(headp, __ATOMIC_ACQUIRE);
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t b = head >> OFFSET_BITS, off = head & OFFSET_MASK;
        unsigned char *slot = m + HEADER_SIZE + (b & (cap - 1)) * SLOT_SIZE;
        uint64_t s1 = ld64(slot, 0);
        if (s1 != b + 1) return fail("ring unexpectedly empty");
        uint64_t lo = __atomic_load_n((uint64_t *)(slot + 8), __ATOMIC_RELAXED);
        uint64_t hi = __atomic_load_n((uint64_t *)(slot + 16), __ATOMIC_RELAXED);
        uint64_t count = __atomic_load_n((uint64_t *)(slot + 24), __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n((uint64_t *)slot, __ATOMIC_RELAXED) != s1) { head = __atomic_load_n(headp, __ATOMIC_ACQUIRE); continue; }
        if (count == 0 || off >= count) return fail("slot content");
        uint64_t next = off + 1 == count ? (b + 1) << OFFSET_BITS : head + 1;
        if (__atomic_compare_exchange_n(headp, &head, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            unsigned __int128 id = (((unsigned __int128)hi << 64) | lo) + off;
            printf("ok id=%016llx:%016llx tail=%llu\n", (unsigned long long)(id >> 64),
                   (unsigned long long)id, (unsigned long long)tail);
            return 0;
        }
    }
    return fail("could not take");
}
