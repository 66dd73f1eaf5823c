/*
 * pytest-umtt deterministic entropy for UML (DESIGN.md fact 9).
 *
 * LD_PRELOADed into the UML kernel process. UML takes its entropy from the host
 * through glibc's getrandom() (os_getrandom in arch/um/os-Linux/util.c: the boot
 * seed and arch_get_random_longs). This replaces it with a PRNG seeded from
 * UMTT_SHIM_SEED, so one seed gives one run. splitmix64 is plenty: the goal is
 * reproducibility, not secrecy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

static uint64_t umtt_state;
static int umtt_seeded;

static uint64_t umtt_next(void)
{
	uint64_t z = (umtt_state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void umtt_seed(void)
{
	const char *seed = getenv("UMTT_SHIM_SEED");

	umtt_state = seed ? strtoull(seed, NULL, 0) : 0;
	umtt_seeded = 1;
}

ssize_t getrandom(void *buf, size_t len, unsigned int flags)
{
	unsigned char *out = buf;
	size_t done = 0;

	(void)flags;
	if (!umtt_seeded)
		umtt_seed();
	while (done < len) {
		uint64_t word = umtt_next();
		size_t chunk = len - done < sizeof(word) ? len - done : sizeof(word);

		memcpy(out + done, &word, chunk);
		done += chunk;
	}
	return (ssize_t)len;
}

int getentropy(void *buf, size_t len)
{
	if (len > 256) {
		errno = EIO;
		return -1;
	}
	getrandom(buf, len, 0);
	return 0;
}

/* A marker the harness reads to tell that the shim is loaded. */
const char umtt_getrandom_shim[] = "pytest-umtt getrandom shim v1";
