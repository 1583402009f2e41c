// Command libcni-harness drives a CNI network list through libcni, the library podman,
// containerd and cri-o link, the way a runtime does. It is built offline against Debian's
// golang-github-appc-cni-dev (GOPATH mode) by crates/weft/tests/libcni.rs.
//
// Usage (every command prints one JSON object on stdout and exits 0, even on failure, so
// the caller can assert on the error text):
//
//	harness validate <conflist>
//	harness add      <conflist> <containerID>=<netns> [...]   (parallel ADDs)
//	harness check    <conflist> <containerID> <netns>
//	harness del      <conflist> <containerID> <netns>
//	harness add-del  <conflist> <containerID> <netns>         (ADD; on failure the runtime's rollback DEL)
//	harness gc       <conflist> [<containerID> ...]           (the valid attachments)
//
// Environment: HARNESS_CNI_PATH (plugin dirs), HARNESS_CACHE (libcni's cache dir),
// HARNESS_CAPTURE (a file; every plugin invocation is appended to it as one JSON line:
// the CNI_* environment, stdin, stdout and the error).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

// capturingExec runs plugins as libcni's default does, and records each call.
type capturingExec struct {
	invoke.RawExec
	version.PluginDecoder
	mu   sync.Mutex
	file string
}

type call struct {
	Plugin string            `json:"plugin"`
	Env    map[string]string `json:"env"`
	Stdin  json.RawMessage   `json:"stdin"`
	Stdout string            `json:"stdout"`
	Error  string            `json:"error,omitempty"`
}

func (e *capturingExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	out, err := e.RawExec.ExecPlugin(ctx, pluginPath, stdin, environ)
	if e.file != "" {
		c := call{Plugin: filepath.Base(pluginPath), Env: map[string]string{}, Stdout: string(out)}
		for _, kv := range environ {
			if strings.HasPrefix(kv, "CNI_") {
				parts := strings.SplitN(kv, "=", 2)
				c.Env[parts[0]] = parts[1]
			}
		}
		if json.Valid(stdin) {
			c.Stdin = stdin
		} else {
			c.Stdin, _ = json.Marshal(string(stdin))
		}
		if err != nil {
			c.Error = err.Error()
		}
		line, _ := json.Marshal(c)
		e.mu.Lock()
		if f, ferr := os.OpenFile(e.file, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); ferr == nil {
			f.Write(append(line, '\n'))
			f.Close()
		}
		e.mu.Unlock()
	}
	return out, err
}

func (e *capturingExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: harness validate|add|check|del|add-del|gc <conflist> ...")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad conflist:", err)
		os.Exit(2)
	}
	exec := &capturingExec{RawExec: invoke.RawExec{Stderr: os.Stderr}, file: os.Getenv("HARNESS_CAPTURE")}
	cfg := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("HARNESS_CNI_PATH")), os.Getenv("HARNESS_CACHE"), exec)
	ctx := context.Background()
	rt := func(id, netns string) *libcni.RuntimeConf {
		return &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: "eth0"}
	}
	args := os.Args[3:]
	switch os.Args[1] {
	case "validate":
		caps, err := cfg.ValidateNetworkList(ctx, list)
		emit(map[string]interface{}{"capabilities": caps, "error": errString(err)})
	case "add":
		type out struct {
			ID     string      `json:"id"`
			Result interface{} `json:"result,omitempty"`
			Error  string      `json:"error"`
		}
		outs := make([]out, len(args))
		var wg sync.WaitGroup
		for i, a := range args {
			wg.Add(1)
			go func(i int, a string) {
				defer wg.Done()
				parts := strings.SplitN(a, "=", 2)
				res, err := cfg.AddNetworkList(ctx, list, rt(parts[0], parts[1]))
				outs[i] = out{ID: parts[0], Result: res, Error: errString(err)}
			}(i, a)
		}
		wg.Wait()
		emit(map[string]interface{}{"adds": outs})
	case "check":
		emit(map[string]interface{}{"error": errString(cfg.CheckNetworkList(ctx, list, rt(args[0], args[1])))})
	case "del":
		emit(map[string]interface{}{"error": errString(cfg.DelNetworkList(ctx, list, rt(args[0], args[1])))})
	case "add-del":
		// What podman does when ADD fails: tear the attachment down again.
		_, addErr := cfg.AddNetworkList(ctx, list, rt(args[0], args[1]))
		delErr := ""
		if addErr != nil {
			delErr = errString(cfg.DelNetworkList(ctx, list, rt(args[0], args[1])))
		}
		emit(map[string]interface{}{"add_error": errString(addErr), "del_error": delErr})
	case "gc":
		// libcni 1.1.2 has no GC (it came with libcni 1.2 / CNI 1.1): invoke, through libcni's
		// invoke package, each plugin of the list that supports CNI 1.1.0 (GC exists only
		// there; portmap 1.1.1 does not), the way libcni 1.2's GCNetworkList builds stdin.
		valid := []map[string]string{}
		for _, id := range args {
			valid = append(valid, map[string]string{"containerID": id, "ifname": "eth0"})
		}
		var firstErr error
		for _, plugin := range list.Plugins {
			var conf map[string]interface{}
			if err := json.Unmarshal(plugin.Bytes, &conf); err != nil {
				firstErr = err
				break
			}
			conf["name"] = list.Name
			conf["cniVersion"] = list.CNIVersion
			conf["cni.dev/valid-attachments"] = valid
			info, err := cfg.GetVersionInfo(ctx, plugin.Network.Type)
			if err != nil || !contains(info.SupportedVersions(), "1.1.0") {
				continue
			}
			stdin, _ := json.Marshal(conf)
			path, err := exec.FindInPath(plugin.Network.Type, cfg.Path)
			if err == nil {
				err = invoke.ExecPluginWithoutResult(ctx, path, stdin, &invoke.Args{Command: "GC", Path: strings.Join(cfg.Path, ":")}, exec)
			}
			if err != nil && firstErr == nil {
				firstErr = err
			}
		}
		emit(map[string]interface{}{"error": errString(firstErr)})
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
