// SPDX-License-Identifier: GPL-2.0
/*
 * umtt_bugs: one planted bug per sanitizer of pytest-umtt's debug kernel, run when the
 * module is loaded: insmod umtt_bugs.ko bug=NAME. Each bug is one the kernel survives,
 * so the sanitizer's report is a splat (a test failure), not a crash.
 *
 *   oob        a write one past the end of a kmalloc'ed buffer (KASAN)
 *   inversion  two mutexes taken in both orders by one task (lockdep)
 *   shift      a 32-bit value shifted by more than its width (UBSAN)
 *   bounds     an array indexed past its end (UBSAN)
 *   none       nothing: the module loads quietly
 *
 * Sizes and indexes come from module parameters, so the compiler cannot see the bug
 * and fold it away or refuse it.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/string.h>

static char *bug = "none";
module_param(bug, charp, 0444);
MODULE_PARM_DESC(bug, "which bug to run at load: oob, inversion, shift, bounds or none");

static int size = 16;
module_param(size, int, 0444);
MODULE_PARM_DESC(size, "size of the buffer the oob bug overruns, and the shift's width");

static DEFINE_MUTEX(umtt_first);
static DEFINE_MUTEX(umtt_second);

static noinline void umtt_bug_oob(void)
{
	char *buffer = kmalloc(size, GFP_KERNEL);

	if (!buffer)
		return;
	buffer[size] = 'x';
	kfree(buffer);
}

static noinline void umtt_bug_inversion(void)
{
	mutex_lock(&umtt_first);
	mutex_lock(&umtt_second);
	mutex_unlock(&umtt_second);
	mutex_unlock(&umtt_first);

	mutex_lock(&umtt_second);
	mutex_lock(&umtt_first);
	mutex_unlock(&umtt_first);
	mutex_unlock(&umtt_second);
}

static noinline void umtt_bug_shift(void)
{
	volatile unsigned int one = 1;
	unsigned int shifted = one << (size * 2 + 8);

	pr_info("umtt_bugs: shifted %u\n", shifted);
}

static noinline void umtt_bug_bounds(void)
{
	int table[4] = { 1, 2, 3, 4 };
	volatile int index = size / 4;

	pr_info("umtt_bugs: table[%d] = %d\n", index, table[index]);
}

static int __init umtt_bugs_init(void)
{
	pr_info("umtt_bugs: running bug %s\n", bug);
	if (!strcmp(bug, "oob"))
		umtt_bug_oob();
	else if (!strcmp(bug, "inversion"))
		umtt_bug_inversion();
	else if (!strcmp(bug, "shift"))
		umtt_bug_shift();
	else if (!strcmp(bug, "bounds"))
		umtt_bug_bounds();
	else if (strcmp(bug, "none"))
		return -EINVAL;
	return 0;
}

static void __exit umtt_bugs_exit(void)
{
}

module_init(umtt_bugs_init);
module_exit(umtt_bugs_exit);
MODULE_DESCRIPTION("Planted bugs for pytest-umtt's sanitizer tests");
MODULE_LICENSE("GPL");
