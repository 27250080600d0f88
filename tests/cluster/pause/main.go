// pause is the sandbox process of every pod on the cluster tier's node: it holds the pod's
// namespaces while the pod lives, reaps the orphans it inherits, and exits on SIGINT or
// SIGTERM. (Kubernetes ships one in C; no registry is reachable here to pull it.)
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
