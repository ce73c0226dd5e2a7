// Command pause is the pod sandbox ("infra") process of ferrovirt's test cluster: it holds the
// pod's namespaces by doing nothing until SIGTERM or SIGINT, then exits 0. As PID 1 of the
// sandbox it also reaps orphaned children, so none linger as zombies.
//
// Build it static (CGO_ENABLED=0) so the image needs no libc.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: pause (no arguments; waits for SIGTERM or SIGINT, then exits 0)")
		os.Exit(2)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	children := make(chan os.Signal, 1)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			reapChildren()
		}
	}
}

// reapChildren collects every exited child without blocking.
func reapChildren() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
