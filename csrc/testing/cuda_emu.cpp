// The CUDA emulator's context switch (see cuda_emu.h): save the callee-saved registers on the
// current stack, swap stack pointers, restore. No system call (swapcontext makes one per
// switch to save the signal mask, which made it the emulator's main cost).
#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// void tp_emu_switch(void** save_sp, void* load_sp)
asm(R"(
  .pushsection .text
  .globl tp_emu_switch
  .type tp_emu_switch, @function
tp_emu_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size tp_emu_switch, .-tp_emu_switch
  .popsection
)");
