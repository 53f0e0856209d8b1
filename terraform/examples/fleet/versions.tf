terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5"
    }
  }
  # Keep the state in an encrypted remote backend: it holds the mesh key. For example:
  # backend "s3" { bucket = "my-tf-state" key = "derpfleet/fleet.tfstate" region = "eu-central-1" encrypt = true }
}
